"""`rlhf status`: states, figures read from the artifacts and the next command, on a finished run, the same run
half-finished (artifacts removed or cut short as a killed stage leaves them) and an empty one."""

import json
import os
import shutil
import time

import pytest
from conftest import read_jsonl, rlhf

from rlhf.status import status


@pytest.fixture
def finished(tiny_eval, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_eval, run)  # copy2: the files keep their times, and so their order
    return run


def status_json(run) -> dict:
    return json.loads(rlhf("status", "--run", run, "--json").stdout)


def test_finished_run_figures_from_its_artifacts(finished):
    st = status_json(finished)
    assert {s: v["state"] for s, v in st["stages"].items()} == dict.fromkeys(
        ["data", "sft", "reward", "ppo", "eval"], "done"
    )
    assert st["next"] is None and st["rounds"] == [] and st["report"] == str(finished / "eval" / "report.html")
    data = json.loads((finished / "data" / "summary.json").read_text())
    assert st["stages"]["data"]["users"] == data["users"] and st["stages"]["data"]["items"] == data["items"]
    sft = json.loads((finished / "sft" / "metrics.json").read_text())
    assert st["stages"]["sft"]["valid_rate"] == sft["samples_after"]["valid_rate"]
    assert st["stages"]["sft"]["steps"] == sft["steps"] == 4
    reward = json.loads((finished / "reward" / "metrics.json").read_text())
    assert st["stages"]["reward"]["accuracy"] == reward["val_accuracy"]
    assert set(st["stages"]["reward"]["accuracy_by_source"]) == set(reward["val_by_source"])
    last = read_jsonl(finished / "ppo" / "metrics.jsonl")[-1]
    ppo = st["stages"]["ppo"]
    assert ppo["updates"] == ppo["total_updates"] == 2 and ppo["checkpoint"] == 2
    assert ppo["last_reward"] == last["reward/reward"] and ppo["last_score"] == last["objective/scores"]
    ev = json.loads((finished / "eval" / "metrics.json").read_text())
    table = {row["row"]: row for row in st["stages"]["eval"]["table"]}
    assert set(table) == set(ev["stages"]) | set(ev["baselines"])
    assert st["stages"]["eval"]["columns"] == ["valid_rate", "hr@3", "ndcg@3", "true_utility"]
    assert table["ppo"]["kind"] == "llm" and table["ease"]["kind"] == "baseline"
    assert table["ppo"]["ndcg@3"] == ev["stages"]["ppo"]["ndcg@3"]
    assert table["popularity"]["true_utility"] == ev["baselines"]["popularity"]["true_utility"]

    text = rlhf("status", "--run", finished).stdout
    for line in ("  ppo     done         2 of 2 updates", "ease (baseline)", "next: nothing left to run"):
        assert line in text, text


def test_out_of_date_stages_and_labeling_rounds_choose_the_next_command(finished):
    # a reward model retrained after PPO and eval ran: both are out of date, PPO (fresh) comes first
    metrics = finished / "reward" / "metrics.json"
    then = metrics.stat().st_mtime
    later = time.time() + 60
    os.utime(metrics, (later, later))
    st = status(finished)
    assert st["stages"]["ppo"]["older_than"] == ["reward"] and st["stages"]["eval"]["older_than"] == ["reward"]
    assert "older_than" not in st["stages"]["sft"] and st["stages"]["ppo"]["state"] == "done"
    assert st["next"] == f"rlhf ppo --run {finished}"
    os.utime(metrics, (then, then))
    assert status(finished)["next"] is None

    # a labeling round: exported -> serve it, judged -> import it, imported with pairs -> retrain the reward model
    round_dir = finished / "labels" / "round-001"
    round_dir.mkdir(parents=True)
    (round_dir / "batch.jsonl").write_text('{"prompt_id": "p1"}\n{"prompt_id": "p2"}\n')
    st = status(finished)
    assert st["rounds"] == [{"round": 1, "state": "exported", "judgments": 0, "prompts": 2}]
    assert st["next"] == f"rlhf label serve --run {finished} --round 1"
    (round_dir / "judgments.jsonl").write_text('{"prompt_id": "p1", "preferred": "c1"}\n{"prompt_id": "p2", "pre')
    st = status(finished)
    assert st["rounds"][0]["state"] == "judging" and st["rounds"][0]["judgments"] == 1  # the cut line not counted
    assert st["next"] == f"rlhf label import --run {finished} --round 1"
    (round_dir / "pairs.parquet").write_bytes(b"")  # status reads only when it was written
    (round_dir / "summary.json").write_text(json.dumps({"round": 1, "pairs": 3, "agreement": {"fleiss_kappa": 0.5}}))
    os.utime(round_dir / "pairs.parquet", (later, later))
    st = status(finished)
    assert st["rounds"][0] == {
        "round": 1,
        "state": "imported",
        "judgments": 1,
        "prompts": 2,
        "pairs": 3,
        "fleiss_kappa": 0.5,
    }
    assert st["stages"]["reward"]["older_than"] == ["round-001"]
    assert st["next"] == f"rlhf reward --run {finished}"
    assert (
        "labels  round-001 imported: 2 prompts, 1 judgments, 3 pairs, Fleiss' kappa 0.50"
        in rlhf("status", "--run", finished).stdout
    )


def test_half_finished_run_is_interrupted_where_a_stage_stopped(finished):
    run = finished
    # PPO killed after its update-2 checkpoint, mid-way through a metrics line, before the final adapter
    shutil.rmtree(run / "ppo" / "adapter")
    (run / "ppo" / "summary.json").unlink()
    lines = (run / "ppo" / "metrics.jsonl").read_text().splitlines()
    (run / "ppo" / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    # eval stopped before its metrics and report: only the listings it had written
    for name in ("metrics.json", "report.html", "report.md"):
        (run / "eval" / name).unlink()
    st = status_json(run)
    states = {s: v["state"] for s, v in st["stages"].items()}
    assert states == {"data": "done", "sft": "done", "reward": "done", "ppo": "interrupted", "eval": "interrupted"}
    ppo = st["stages"]["ppo"]
    assert ppo["unfinished"] == ["ppo/adapter/adapter_config.json", "ppo/summary.json"]
    assert ppo["updates"] == 1 and ppo["checkpoint"] == 2 and ppo["total_updates"] == 2  # the total: config.yaml
    assert ppo["last_reward"] == json.loads(lines[0])["reward/reward"]
    assert st["stages"]["eval"]["unfinished"] == ["eval/metrics.json", "eval/report.html"]
    assert st["next"] == f"rlhf ppo --run {run} --resume" and st["report"] is None
    text = rlhf("status", "--run", run).stdout
    assert "ppo     interrupted  1 of 2 updates, checkpoint at update 2" in text
    assert f"next: rlhf ppo --run {run} --resume" in text

    # SFT's metrics cut short (killed while writing): SFT is interrupted and comes first
    metrics = run / "sft" / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    st = status(run)
    assert st["stages"]["sft"]["state"] == "interrupted"
    assert st["stages"]["sft"]["unfinished"] == ["sft/metrics.json"]
    assert st["next"] == f"rlhf sft --run {run}"
    # PPO without any checkpoint starts again rather than resuming
    shutil.rmtree(run / "ppo" / "checkpoints")
    metrics.write_text(json.dumps({"steps": 4}))
    assert status(run)["next"] == f"rlhf ppo --run {run}"


def test_empty_and_absent_runs(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    st = status_json(empty)
    assert st["exists"] and st["rounds"] == [] and st["report"] is None
    assert {v["state"] for v in st["stages"].values()} == {"missing"}
    assert st["next"] == f"rlhf data prepare --out {empty}"
    text = rlhf("status", "--run", tmp_path / "nope").stdout
    assert "(no such directory)" in text and f"next: rlhf data prepare --out {tmp_path / 'nope'}" in text
    # a data stage that stopped half-way is prepared again with the settings it began with
    (empty / "data").mkdir()
    (empty / "data" / "catalog.jsonl").write_text("{}\n")
    (empty / "config.yaml").write_text("run: {name: x}\n")
    st = status(empty)
    assert st["stages"]["data"]["state"] == "interrupted"
    assert st["next"] == f"rlhf data prepare --out {empty} --config {empty / 'config.yaml'}"
