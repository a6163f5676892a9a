"""`rlhf rounds`: label -> reward -> RL -> eval, round after round, through the CLI with the real stages on the tiny
model. A simulated 2-round loop is SIGKILLed at round 2's RL step and run again: it resumes at that step, no judgment
is lost or counted twice, and it writes every round's reward model, adapter and eval and the round table. Round 2's
reward model starts from round 1's, its policy from round 1's adapter with the SFT model as the unchanged reference.
People label a round through the server's API until its queue is judged; a deadline with nothing judged stops the
loop cleanly; a stop closes a served round with what was judged."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT, TINY, free_port, read_jsonl, rlhf

QUIET = "track.report_to=none"  # the trackers are tested elsewhere; here they would only cost time
LABELERS, UPDATES = 3, 2  # label.labelers' default; tiny.yaml's ppo.total_updates


def _fresh(tiny_reward: Path, path: Path) -> Path:
    shutil.copytree(tiny_reward, path)
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _state(run: Path) -> dict:
    try:
        return json.loads((run / "rounds" / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def _processes_on(run: Path) -> list[int]:
    """Other processes whose command line names the run (a stage the loop started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if str(run).encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def call(port: int, method: str, path: str, token: str | None = None, body: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        return resp.status, json.loads(payload) if payload else None
    finally:
        conn.close()


def wait_for_server(port: int, proc: subprocess.Popen | None, log: Path | None = None, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            if call(port, "GET", "/api/progress")[0] == 401:
                return
        except OSError:
            pass
        if (proc is not None and proc.poll() is not None) or time.time() > deadline:
            raise AssertionError(f"the labeling server did not start:\n{log.read_text()[-4000:] if log else ''}")
        time.sleep(0.2)


def label_queue(port: int, token: str, repeat_first: bool = False) -> int:
    """One labeler judges their whole queue through the API (the first list every time); returns judgments sent."""
    sent = 0
    while True:
        status, row = call(port, "GET", "/api/next", token)
        if status == 204:
            return sent
        assert status == 200, (status, row)
        body = {
            "batch_id": row["batch_id"],
            "prompt_id": row["prompt_id"],
            "preferred": row["candidates"][0]["candidate_id"],
            "idempotency_key": f"{token}:{row['prompt_id']}",
        }
        assert call(port, "POST", "/api/judgments", token, body)[0] == 201
        if repeat_first and not sent:  # a retried request: acknowledged again, stored once
            assert call(port, "POST", "/api/judgments", token, body)[0] == 200
        sent += 1


# ---------------------------------------------------------------- simulated: killed mid-round, run again


@pytest.fixture(scope="module")
def rounds_run(tiny_reward, tmp_path_factory):
    """Two simulated rounds on a copy of the tiny run (data, SFT, reward; no RL yet), SIGKILLed in round 2's RL step
    once it has checkpointed its first update, and run again to the end. Keeps what was on disk at the kill and both
    invocations' output."""
    work = tmp_path_factory.mktemp("rounds")
    run = _fresh(tiny_reward, work / "run")
    args = ["rounds", "--run", str(run), "--config", TINY, "--rounds", "2", QUIET]
    log = work / "first.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline, checkpoint = time.time() + 900, run / "ppo/checkpoints/update-000001/state.json"
        # round 2's RL step clears ppo/ before it is marked started: a checkpoint seen after that is round 2's
        while not (_state(run).get("rounds", {}).get("2", {}).get("rl_started") and checkpoint.exists()):
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"the loop never reached round 2's RL step:\n{log.read_text()[-4000:]}")
            time.sleep(0.02)
        judgments = {r: (run / f"labels/round-00{r}/judgments.jsonl").read_bytes() for r in (1, 2)}
        batches = {r: (run / f"labels/round-00{r}/batch.jsonl").read_bytes() for r in (1, 2)}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    deadline = time.time() + 60  # the RL stage dies with the loop (PR_SET_PDEATHSIG), not later
    while _processes_on(run):
        assert time.time() < deadline, f"a stage outlived the killed loop: {_processes_on(run)}"
        time.sleep(0.2)
    status_at_kill = json.loads(rlhf("status", "--run", run, "--json").stdout)
    second = rlhf(*args)
    third = rlhf(*args)  # everything done: runs nothing, prints the table
    return SimpleNamespace(
        run=run,
        first=log.read_text(),
        second=second.stdout,
        third=third.stdout,
        judgments=judgments,
        batches=batches,
        status_at_kill=status_at_kill,
        sft_digest=_digest(tiny_reward / "sft" / "merged" / "model.safetensors"),
        reward_digest=_digest(tiny_reward / "reward" / "model" / "model.safetensors"),
    )


def test_two_rounds_keep_every_round_and_report_the_table(rounds_run):
    from rlhf.round_table import round_rows
    from rlhf.runs import RunDir

    run = rounds_run.run
    state = _state(run)
    assert sorted(state["rounds"], key=int) == ["0", "1", "2"]
    assert state["rounds"]["0"]["steps"] == ["keep", "eval"]
    for r in (1, 2):
        assert state["rounds"][str(r)]["steps"] == ["export", "judge", "import", "reward", "rl", "eval"]
        kept = run / "rounds" / f"round-00{r}"
        for f in ("reward/model/config.json", "reward/metrics.json", "ppo/adapter/adapter_model.safetensors"):
            assert (kept / f).exists(), f
        assert json.loads((kept / "ppo/summary.json").read_text())["updates"] == UPDATES
        assert "ppo" in json.loads((kept / "eval/metrics.json").read_text())["stages"]
        assert not (kept / "ppo" / "checkpoints").exists()  # the resume record is not kept, the result is
        labels = json.loads((run / f"labels/round-00{r}/summary.json").read_text())
        assert labels["judgments"]["used"] == labels["prompts"] * LABELERS
    assert state["rounds"]["1"]["export"]["policy"] == "sft" and state["rounds"]["2"]["export"]["policy"] == "ppo"
    # the round table: a row per round, RL updates adding up, in the report and in status
    rows = round_rows(RunDir(run))
    assert [(row["round"], row["policy"], row["rl_updates"]) for row in rows] == [
        (0, "sft", 0),
        (1, "ppo", UPDATES),
        (2, "ppo", 2 * UPDATES),
    ]
    assert all(row["kl_to_sft"] is not None and row["coverage"] is not None for row in rows[1:])
    assert [row["pairs_added"] for row in rows[1:]] == [0, 0]  # the tiny model's noise: every list is "both bad"
    md, html = (run / "eval/report.md").read_text(), (run / "eval/report.html").read_text()
    assert "## Rounds" in md and "| 2 | ppo | 4 |" in md
    assert "<h2>Rounds</h2>" in html and html.count("<tr>") >= 4
    status = rlhf("status", "--run", run)
    assert "rounds: 2 of 2 done" in status.stdout
    assert json.loads(rlhf("status", "--run", run, "--json").stdout)["loop"]["unfinished"] is None
    # once done, the same command runs nothing
    assert "rounds: round" not in rounds_run.third and "RL updates" in rounds_run.third


def test_sigkill_mid_round_resumes_at_the_step_it_stopped_in(rounds_run):
    run = rounds_run.run
    assert rounds_run.status_at_kill["loop"]["unfinished"] == {"round": 2, "step": "rl"}
    assert rounds_run.status_at_kill["next"] == f"rlhf rounds --run {run} --rounds 2"
    second = rounds_run.second
    assert "round 2 (labels round 2): resuming at step rl (done: export, judge, import, reward)" in second
    for step in ("export", "judge", "import", "reward"):  # nothing before the RL step ran again
        assert f"round 2 (labels round 2): {step}\n" not in second
    assert "round 1 (" not in second and "round 0 (" not in second
    # within the step, the RL stage went on from its checkpoint
    assert "ppo: resuming from update-000001 (1 of 2 updates done)" in second
    assert json.loads((run / "rounds/round-002/ppo/summary.json").read_text())["resumed_at"] == 1
    # no judgment lost or counted twice: the logs are byte for byte what they were at the kill, one per labeler and
    # prompt, and each import counted each once
    for r in (1, 2):
        folder = run / f"labels/round-00{r}"
        assert (folder / "judgments.jsonl").read_bytes() == rounds_run.judgments[r]
        assert (folder / "batch.jsonl").read_bytes() == rounds_run.batches[r]
        lines, prompts = read_jsonl(folder / "judgments.jsonl"), read_jsonl(folder / "batch.jsonl")
        assert len({(j["labeler"], j["prompt_id"]) for j in lines}) == len(lines) == len(prompts) * LABELERS
        assert json.loads((folder / "summary.json").read_text())["judgments"]["used"] == len(lines)
    assert not (run / "labels/round-003").exists() and sorted(_state(run)["rounds"]) == ["0", "1", "2"]


def test_round_two_reward_model_starts_from_round_one(rounds_run):
    run = rounds_run.run
    kept = [run / "rounds" / f"round-00{r}" / "reward" for r in (0, 1, 2)]
    for r in (1, 2):
        metrics = json.loads((kept[r] / "metrics.json").read_text())
        assert metrics["init"] == str(kept[r - 1] / "model")  # warm: from the previous round's, not SFT
        assert _state(run)["rounds"][str(r)]["reward"]["init"] == str(kept[r - 1] / "model")
        assert _digest(kept[r] / "model/model.safetensors") != _digest(kept[r - 1] / "model/model.safetensors")
    # the reward model the loop began with is kept as it was
    assert _digest(kept[0] / "model/model.safetensors") == rounds_run.reward_digest


def test_round_two_policy_continues_round_one_adapter_with_the_sft_reference(rounds_run):
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf.config import load_config
    from rlhf.models import load_causal_lm, load_tokenizer
    from rlhf.rollout import PPOPolicy, build_policy, lora_digest

    run = rounds_run.run
    sft, adapter = run / "sft" / "merged", run / "rounds/round-001/ppo/adapter"
    first, second = (json.loads((run / f"rounds/round-00{r}/ppo/summary.json").read_text()) for r in (1, 2))
    assert first["init_adapter"] is None and first["reference"] == second["reference"] == str(sft)
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    assert second["init_adapter"] == {"path": str(adapter), "digest": lora_digest(saved)}
    assert _digest(sft / "model.safetensors") == rounds_run.sft_digest  # the reference never changed
    # what the RL stage builds from those: round 1's adapter weights exactly, and with the adapter off, the SFT model
    cfg = load_config(TINY, ["model.dtype=float32"])
    tokenizer = load_tokenizer(str(sft))
    policy, start = build_policy(PPOPolicy, sft, cfg.model, tokenizer.pad_token_id, adapter)
    own = get_peft_model_state_dict(policy)
    assert set(own) == set(saved) and all(torch.equal(own[k].float(), saved[k].float()) for k in saved)
    assert start["init_adapter"]["digest"] == lora_digest(saved)
    ids = torch.tensor([tokenizer("1. Alien (1979) — sci-fi like Aliens")["input_ids"]])
    with torch.no_grad():
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
        plain = load_causal_lm(str(sft))(input_ids=ids).logits
        tuned = policy(input_ids=ids).logits
    assert torch.allclose(reference, plain, atol=1e-5)
    assert not torch.allclose(tuned, plain, atol=1e-5)  # the adapter the policy starts from is a trained one


# ---------------------------------------------------------------- people


def test_people_judge_a_round_through_the_api_then_the_loop_goes_on(tiny_reward, tmp_path):
    run = _fresh(tiny_reward, tmp_path / "run")
    tokens = {"ana": "token-ana-0123456789", "bo": "token-bo-0123456789"}
    (tmp_path / "tokens.csv").write_text("".join(f"{k},{v}\n" for k, v in tokens.items()))
    port, log = free_port(), tmp_path / "rounds.log"
    args = ["rounds", "--run", run, "--config", TINY, "--rounds", "1", "--labelers", "people"]
    args += ["--tokens-file", tmp_path / "tokens.csv", f"label.port={port}", "label.prompts=4", QUIET]
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "rlhf", *map(str, args)], cwd=ROOT, stdout=out, stderr=out)
        try:
            wait_for_server(port, proc, log)
            assert call(port, "GET", "/api/next", "not-a-labeler-token")[0] == 401
            sent = sum(label_queue(port, tok, repeat_first=True) for tok in tokens.values())
            rc = proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
    output = log.read_text()
    assert rc == 0, output[-4000:]
    assert sent == 8 and "the queue is judged: 8 judgments on 4 of 4 prompts" in output
    assert port_is_free(port)  # the server stopped by itself
    folder = run / "labels/round-001"
    assert len(read_jsonl(folder / "judgments.jsonl")) == 8  # the retried POSTs stored nothing
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["judgments"]["used"] == 8 and summary["labelers"] == {"ana": 4, "bo": 4}
    assert summary["pairs"] == 4 and summary["agreement"]["pairwise"] == 1.0  # both picked the first list shown
    reward = json.loads((run / "rounds/round-001/reward/metrics.json").read_text())
    assert reward["pairs"]["read"]["labels:round-001"] == 4  # the round's pairs reached the reward model
    state = _state(run)
    assert state["rounds"]["1"]["steps"][-1] == "eval" and state["rounds"]["1"]["judge"]["why"] == "judged"
    from rlhf.round_table import round_rows
    from rlhf.runs import RunDir

    row = round_rows(RunDir(run))[1]
    assert row["pairs_added"] == 4 and row["agreement"] == 1.0 and row["judgments"] == 8


def test_a_deadline_with_nothing_judged_stops_cleanly_and_resumes_at_judging(tiny_reward, tmp_path):
    run = _fresh(tiny_reward, tmp_path / "run")
    port = free_port()
    args = ["rounds", "--run", run, "--config", TINY, "--labelers", "people", "--deadline", "2"]
    args += ["--token", "a-labeler-token", f"label.port={port}", QUIET]
    proc = rlhf(*args, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "round 1: the deadline (2 s) passed: 0 judgments on 0 of" in proc.stderr
    assert "Nothing to import: run the same command to serve round 1 again" in proc.stderr
    assert port_is_free(port)
    assert _state(run)["rounds"]["1"]["steps"] == ["export"]
    batch = (run / "labels/round-001/batch.jsonl").read_bytes()
    again = rlhf(*args, check=False)
    assert again.returncode == 1 and "resuming at step judge (done: export)" in again.stdout
    assert (run / "labels/round-001/batch.jsonl").read_bytes() == batch  # served again, not exported again


def test_a_stop_closes_the_served_round_with_what_was_judged(tiny_data, tmp_path):
    """The serving step in this process: a stop (`rlhf rounds --stop`) ends it with the judgments made; the server
    has stopped when it returns and the stop is consumed."""
    from rlhf.config import load_config
    from rlhf.labeling.session import serve_until_judged
    from rlhf.rounds import LoopState
    from rlhf.runs import RunDir

    run = RunDir(shutil.copytree(tiny_data, tmp_path / "run"))
    rlhf("label", "export", "--run", run.root, "--config", TINY, "--round", 1, "--prompts", 3, "--stages", "base")
    port = free_port()
    cfg = load_config(TINY, [f"label.port={port}", "rounds.labelers=people"])
    token = "a-labeler-token"
    LoopState(run.rounds.state).save()
    result = {}
    serving = threading.Thread(
        target=lambda: result.update(done=serve_until_judged(cfg, run.root, 1, {token: "ana"}, run.rounds.stop))
    )
    serving.start()
    wait_for_server(port, None, timeout=60)
    row = call(port, "GET", "/api/next", token)[1]
    body = {"batch_id": row["batch_id"], "prompt_id": row["prompt_id"], "preferred": "tie", "idempotency_key": "k1"}
    assert call(port, "POST", "/api/judgments", token, body)[0] == 201
    rlhf("rounds", "--run", run.root, "--stop")
    serving.join(timeout=30)
    assert not serving.is_alive()
    judging = result["done"]
    assert (judging.why, judging.judgments, judging.prompts_judged) == ("stop", 1, 1)
    assert not run.rounds.stop.exists() and port_is_free(port)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--rounds", "0"], 2, "rounds.rounds must be >= 1"),  # the flags are the rounds section's fields
        (["reward.sources=ratings,clicks"], 2, "reward.sources has no 'labels'"),
        (["--labelers", "people", "--tokens-file", "/nonexistent/tokens.csv"], 1, "/nonexistent/tokens.csv"),
    ],
)
def test_rounds_config_errors_name_the_field(tiny_reward, tmp_path, args, code, message):
    run = _fresh(tiny_reward, tmp_path / "run")
    proc = rlhf("rounds", "--run", run, "--config", TINY, *args, check=False)
    assert proc.returncode == code and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "rounds").exists()  # nothing ran


def test_rounds_need_sft_and_a_reward_model_and_stop_needs_a_loop(tiny_sft, tmp_path):
    run = shutil.copytree(tiny_sft, tmp_path / "run")
    proc = rlhf("rounds", "--run", run, "--config", TINY, check=False)
    assert proc.returncode == 1 and "rlhf reward --run" in proc.stderr
    proc = rlhf("rounds", "--run", run, "--stop", check=False)
    assert proc.returncode == 1 and "rounds/state.json is missing" in proc.stderr


def test_warm_start_flags_check_their_inputs(tiny_reward, tmp_path):
    run = _fresh(tiny_reward, tmp_path / "run")
    proc = rlhf("reward", "--run", run, "--config", TINY, "--init-from", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and "--init-from" in proc.stderr and "no saved reward model" in proc.stderr
    proc = rlhf("reward", "--run", run, "--config", TINY, "--init-from", run / "reward" / "model", check=False)
    assert proc.returncode == 2 and "is the model this stage writes" in proc.stderr
    # an adapter of another rank than the policy's (tiny.yaml: model.lora_r=8)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 4, "target_modules": ["q_proj"]}))
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    proc = rlhf("rl", "--run", run, "--config", TINY, "--init-adapter", adapter, check=False)
    assert proc.returncode == 2 and "--init-adapter" in proc.stderr and "model.lora_r=8" in proc.stderr
    proc = rlhf("ppo", "--run", run, "--config", TINY, "--init-adapter", tmp_path / "nowhere", check=False)
    assert proc.returncode == 1 and "no saved PEFT adapter there" in proc.stderr
