import pytest
import yaml
from conftest import TINY

from rlhf.config import ConfigError, load_config, save_resolved
from rlhf.runs import RunDir


def test_recipe_and_overrides_merge(tmp_path):
    cfg = load_config(TINY, ["sft.max_steps=7", "learning_rate=0.5", "data.k=4"], default_section="sft")
    assert cfg.model.name == "tiny"
    assert cfg.sft.max_steps == 7 and cfg.sft.learning_rate == 0.5
    assert cfg.data.k == 4
    assert cfg.ppo.reward_weights["in_catalog"] == 1.0


def test_nested_override_and_list_from_comma():
    cfg = load_config(None, ["ppo.reward_weights.explained=2", "reward.sources=ratings,clicks"])
    assert cfg.ppo.reward_weights["explained"] == 2.0
    assert cfg.ppo.reward_weights["has_k"] == 1.0  # the other terms keep their defaults
    assert cfg.reward.sources == ["ratings", "clicks"]


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (["sft.lr=1"], "unknown field(s) sft.lr"),
        (["sft.max_steps=abc"], "sft.max_steps expects int"),
        (["ppo.batch_size=7"], "divisible by ppo.mini_batches"),
        (["ppo.lam=1.5"], "ppo.lam must be in [0, 1]"),
        (["data.mode=rerank", "data.num_candidates=3"], "must exceed data.k"),
        (["data.source=movielens"], "needs data.path"),
        (["eval.stages=base,dpo"], "unknown ['dpo']"),
        (["nosuch.x=1"], "unknown section 'nosuch'"),
        (["ppo.algorithm=a2c"], "ppo.algorithm='a2c' is not one of ppo, grpo, rloo"),
        (["ppo.algorithm=grpo", "ppo.num_generations=3"], "ppo.batch_size (8) must be a multiple of it"),
        (["ppo.algorithm=rloo", "ppo.num_generations=1"], "compares ppo.num_generations >= 2"),
    ],
)
def test_validation_errors_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert needle in str(err.value)


def test_bad_yaml_and_unknown_section(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("training:\n  x: 1\n")
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_resolved_config_is_merged_per_stage(tmp_path):
    cfg = load_config(TINY, ["sft.max_steps=3"])
    save_resolved(cfg, RunDir(tmp_path), ["sft"])
    cfg2 = load_config(TINY, ["reward.max_steps=9"])
    save_resolved(cfg2, RunDir(tmp_path), ["reward"])
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["sft"]["max_steps"] == 3 and saved["reward"]["max_steps"] == 9
    assert saved["model"]["name"] == "tiny"


def test_resolved_config_survives_concurrent_writers(tmp_path):
    """Every rank of a multi-process launch saves the resolved config at once: no writer may fail on
    another's temporary file, and the result is one whole YAML file with nothing left beside it."""
    import threading

    cfg = load_config(TINY)
    errors = []

    def save():
        try:
            for _ in range(30):
                save_resolved(cfg, RunDir(tmp_path), ["sft"])
        except Exception as e:  # noqa: BLE001 - any failure is the finding
            errors.append(e)

    threads = [threading.Thread(target=save) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads) and errors == []
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["sft"]["max_steps"] == cfg.sft.max_steps
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
