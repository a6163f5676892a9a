"""Experiment tracking: every training stage of the shared tiny run logs to TensorBoard and trackio (conftest's
tiny_sft turns both on; reward and PPO inherit it from the run's config.yaml). The logs are read back with
TensorBoard's own event reader and from trackio's local SQLite store."""

import json
import sqlite3
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, read_jsonl

from rlhf.config import ConfigError, load_config, missing_packages


def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}
    return scalars, events.Tags()["tensors"]


def trackio_store(run) -> tuple[dict[str, dict[int, dict]], dict[str, dict]]:
    """trackio's local store under RUN/logs/trackio: metrics per run name and step, and each run's config."""
    db = sqlite3.connect(run / "logs" / "trackio" / "rec-rlhf.db")
    metrics = {}
    for name, step, values in db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id"):
        metrics.setdefault(name, {}).setdefault(step, {}).update(json.loads(values))
    configs = {name: json.loads(c) for name, c in db.execute("SELECT run_name, config FROM configs")}
    return metrics, configs


# per stage: a scalar logged every step (the trainers' loss; PPO's per-update objective and reward terms) and
# the final figures from the stage's metrics.json / summary.json
STAGE_KEYS = {
    "sft": ("train/loss", "final/samples_after/valid_rate", "sft/metrics.json"),
    "reward": ("train/loss", "final/val_accuracy", "reward/metrics.json"),
    "ppo": ("objective/scores", "final/updates", "ppo/summary.json"),
}


@pytest.mark.parametrize("stage", ["sft", "reward", "ppo"])
def test_stage_logs_to_tensorboard_and_trackio(tiny_ppo, stage):
    step_key, final_key, final_file = STAGE_KEYS[stage]
    group = tiny_ppo.name  # the run directory's name
    final = json.loads((tiny_ppo / final_file).read_text())
    final_value = final["samples_after"]["valid_rate"] if stage == "sft" else final[final_key.split("/")[-1]]
    if stage == "ppo":
        updates = read_jsonl(tiny_ppo / "ppo" / "metrics.jsonl")
        expected = {r["update"]: r for r in updates}  # every update, as ppo/metrics.jsonl has it
    else:
        log = [e for e in read_jsonl(tiny_ppo / stage / "log.jsonl") if "loss" in e]
        expected = {e["step"]: {"train/loss": e["loss"]} for e in log}
    assert sorted(expected) == ([1, 2] if stage == "ppo" else [1, 2, 3, 4])

    scalars, tensors = tensorboard_scalars(tiny_ppo / "logs" / "tensorboard" / stage)
    assert {s: pytest.approx(v[step_key]) for s, v in expected.items()} == scalars[step_key]
    assert list(scalars[final_key].values()) == [pytest.approx(final_value)]
    assert "config/text_summary" in tensors  # the resolved config, as text
    if stage == "ppo":
        assert {"reward/learned", "reward/in_catalog", "loss/policy_avg", "time/generation_s"} <= set(scalars)

    metrics, configs = trackio_store(tiny_ppo)
    name = f"{group}/{stage}"
    assert sorted(s for s, v in metrics[name].items() if step_key in v) == sorted(expected)
    assert metrics[name][max(expected)][step_key] == pytest.approx(expected[max(expected)][step_key])
    assert any(v.get(final_key) == pytest.approx(final_value) for v in metrics[name].values())
    config = configs[name]
    assert config["_Group"] == group and config["stage"] == stage
    assert config["track"]["report_to"] == ["tensorboard", "trackio"]
    assert config[stage] == json.loads(json.dumps(load_config(tiny_ppo / "config.yaml").to_dict()[stage]))


def test_missing_tracker_package_is_a_config_error_naming_the_pip_command(tmp_path):
    """trackio made unimportable in a fresh process (sys.modules[name] = None is how Python blocks an import)."""
    args = ["sft", "--run", str(tmp_path), "--config", TINY, "track.report_to=tensorboard,trackio"]
    code = f"import sys; sys.modules['trackio'] = None\nfrom rlhf.cli import main\nsys.exit(main({args!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "track.report_to=tensorboard,trackio needs the package(s) trackio" in proc.stderr
    assert "pip install trackio" in proc.stderr and "Traceback" not in proc.stderr
    assert missing_packages(["tensorboard", "trackio", "no_such_tracker_package"]) == ["no_such_tracker_package"]


def test_tracker_choices_and_the_moved_ppo_field(tmp_path):
    assert load_config(None, []).track.report_to == []
    assert load_config(None, ["track.report_to=none"]).track.report_to == []
    assert load_config(None, ["track.report_to=trackio,tensorboard,trackio"]).track.report_to == [
        "trackio",
        "tensorboard",
    ]
    with pytest.raises(ConfigError, match="track.report_to='mlflow' is not one of tensorboard, trackio, wandb"):
        load_config(None, ["track.report_to=mlflow"])
    # ppo.report_to (PPO only) moved to track.report_to: older recipes and runs' config.yaml still load
    old = tmp_path / "old.yaml"
    old.write_text("ppo:\n  report_to: tensorboard\n  total_updates: 3\n")
    cfg = load_config(old)
    assert cfg.track.report_to == ["tensorboard"] and cfg.ppo.total_updates == 3
    old.write_text("ppo:\n  report_to: none\n")
    assert load_config(old).track.report_to == []
