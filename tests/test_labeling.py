"""Labeling rounds: export, the store's guarantees, import rules, the server under load, faults and bad
requests (a real uvicorn process on 127.0.0.1), simulated labelers, and a real headless Chromium."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY, free_port, read_jsonl, rlhf

N_LABELERS, PER_LABELER = 50, 20


@pytest.fixture(scope="module")
def label_run(tmp_path_factory):
    """Tiny built-in data with 24 validation users and a round-1 batch of 20 prompts from the base model."""
    run = tmp_path_factory.mktemp("label") / "run"
    rlhf("data", "prepare", "--out", run, "--config", TINY, "data.val_fraction=0.4")
    rlhf("label", "export", "--run", run, "--config", TINY, "--round", 1, "--prompts", PER_LABELER, "--stages", "base")
    return run


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def tokens_file(path: Path, n: int) -> dict[str, str]:
    tokens = {f"lab{i:02d}": f"token-{i:02d}-{'x' * 12}" for i in range(n)}
    path.write_text("# labeler,token\n" + "".join(f"{k},{v}\n" for k, v in tokens.items()))
    return tokens


# Runs `rlhf` with os.fsync and os.fdatasync wrapped: each call goes through to the real one, then
# appends "<inode> <size>" of the synced file to the spy log (argv[1]) with an unbuffered O_APPEND write,
# so the record survives a SIGKILL of the process and says how much of each file was on disk.
FSYNC_SPY = r"""
import os, sys
spy_log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
def wrap(real):
    def synced(fd):
        real(fd)
        st = os.fstat(fd)
        os.write(spy_log, f"{st.st_ino} {st.st_size}\n".encode())
    return synced
os.fsync, os.fdatasync = wrap(os.fsync), wrap(os.fdatasync)
from rlhf.cli import main
sys.exit(main(sys.argv[2:]))
"""


def synced_bytes(spy_log: Path, path: Path) -> int:
    """The most of ``path`` an fsync ever covered, from the spy's log (0 when it was never synced)."""
    ino = path.stat().st_ino
    sizes = [int(size) for line in spy_log.read_text().splitlines() for i, size in [line.split()] if int(i) == ino]
    return max(sizes, default=0)


@contextlib.contextmanager
def server(run: Path, round_no: int, tokens: Path, port: int, fsync_spy: Path | None = None):
    launcher = ["-c", FSYNC_SPY, str(fsync_spy)] if fsync_spy else ["-m", "rlhf"]
    proc = subprocess.Popen(
        [
            sys.executable,
            *launcher,
            "label",
            "serve",
            "--run",
            str(run),
            "--round",
            str(round_no),
            "--tokens-file",
            str(tokens),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.time() + 60
        while True:
            try:
                if request(port, "GET", "/api/progress")[0] == 401:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"server did not start: {proc.stdout.read()}")
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)


def request_full(port, method, path, token=None, body=None, raw=None, headers=None, chunks=None):
    """(status, payload, headers) of one request; ``chunks`` sends the body chunked, with no Content-Length."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    h = dict(headers or {})
    if token:
        h["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if chunks is not None:
        data = iter(chunks)
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=h, encode_chunked=chunks is not None)
        resp = conn.getresponse()
        payload = resp.read()
        return (
            resp.status,
            (
                json.loads(payload)
                if payload and resp.getheader("content-type", "").startswith("application/json")
                else payload.decode(errors="replace")
            ),
            {k.lower(): v for k, v in resp.getheaders()},
        )
    finally:
        conn.close()


def request(port, method, path, token=None, body=None, raw: bytes | None = None, headers=None):
    return request_full(port, method, path, token, body, raw, headers)[:2]


def judgments_on_disk(run: Path, round_no: int = 1) -> list[dict]:
    return read_jsonl(run / "labels" / f"round-{round_no:03d}" / "judgments.jsonl")


# ---------------------------------------------------------------- export


def test_export_is_deterministic_and_hides_provenance(label_run, tmp_path):
    again = copy_run(label_run, tmp_path / "again")
    shutil.rmtree(again / "labels")
    rlhf(
        "label", "export", "--run", again, "--config", TINY, "--round", 1, "--prompts", PER_LABELER, "--stages", "base"
    )
    a = (label_run / "labels/round-001/batch.jsonl").read_text()
    assert a == (again / "labels/round-001/batch.jsonl").read_text()
    rows = [json.loads(line) for line in a.splitlines()]
    assert len(rows) == PER_LABELER and len({r["batch_id"] for r in rows}) == 1
    for r in rows:
        assert 2 <= len(r["candidates"]) and len({c["text"] for c in r["candidates"]}) == len(r["candidates"])
        assert "stage" not in json.dumps(r["candidates"])  # labelers never see which stage wrote a list
        assert r["history"] and all(h["title"] for h in r["history"])
    prov = read_jsonl(label_run / "labels/round-001/provenance.jsonl")
    assert {p["prompt_id"] for p in prov} == {r["prompt_id"] for r in rows}
    assert all(c["stage"] == "base" for p in prov for c in p["candidates"].values())
    manifest = json.loads((label_run / "labels/round-001/manifest.json").read_text())
    assert manifest["batch_id"] == rows[0]["batch_id"] and manifest["prompts"] == PER_LABELER
    # a round that already has judgments is never overwritten
    (again / "labels/round-001/judgments.jsonl").write_text('{"x": 1}\n')
    proc = rlhf("label", "export", "--run", again, "--config", TINY, "--round", 1, "--stages", "base", check=False)
    assert proc.returncode == 1 and "already holds judgments" in proc.stderr


# ---------------------------------------------------------------- store and import


def _store(run):
    from rlhf.labeling.batch import Batch
    from rlhf.labeling.store import JudgmentStore

    batch = Batch.load(run, 1)
    return batch, JudgmentStore(run / "labels/round-001/judgments.jsonl", batch)


def test_store_idempotency_and_refusals(label_run, tmp_path):
    from rlhf.labeling.store import JudgmentError

    run = copy_run(label_run, tmp_path / "run")
    batch, store = _store(run)
    row = batch.rows[0]
    body = {
        "batch_id": batch.batch_id,
        "prompt_id": row["prompt_id"],
        "preferred": row["candidates"][0]["candidate_id"],
        "idempotency_key": "k1",
    }
    assert store.add("ann", body)[0] == 201
    assert store.add("ann", dict(body))[0] == 200  # a retry is acknowledged, not stored again
    for bad, status in [
        ({**body, "preferred": "tie"}, 409),  # same key, different judgment
        ({**body, "idempotency_key": "k2"}, 409),  # same prompt judged twice
        ({**body, "preferred": "c9", "idempotency_key": "k3"}, 422),
        ({**body, "prompt_id": "nope", "idempotency_key": "k4"}, 404),
        ({**body, "comment": 5, "idempotency_key": "k5"}, 422),
    ]:
        with pytest.raises(JudgmentError) as e:
            store.add("ann", bad)
        assert e.value.status == status
    assert store.add("bob", body)[0] == 201  # keys are per labeler
    store.close()
    assert len(judgments_on_disk(run)) == 2


def test_import_rules(label_run, tmp_path):
    import pyarrow.parquet as pq

    run = copy_run(label_run, tmp_path / "run")
    batch, store = _store(run)
    r0, r1, r2 = batch.rows[:3]
    c = lambda row, i: row["candidates"][i]["candidate_id"]  # noqa: E731
    plan = [
        ("ann", r0, c(r0, 0)),
        ("bob", r0, c(r0, 0)),
        ("cat", r0, c(r0, 1)),  # 2:1 -> one pair
        ("ann", r1, "tie"),
        ("bob", r1, "both_bad"),  # no pair
        ("ann", r2, c(r2, 0)),
        ("bob", r2, c(r2, 1)),
    ]  # 1:1 -> no pair
    for lab, row, pref in plan:
        store.add(
            lab,
            {
                "batch_id": batch.batch_id,
                "prompt_id": row["prompt_id"],
                "preferred": pref,
                "idempotency_key": f"{lab}-{row['prompt_id']}",
            },
        )
    store.close()
    log = run / "labels/round-001/judgments.jsonl"
    first = log.read_text().splitlines()[0]
    with open(log, "a") as f:
        f.write(first + "\n")  # a duplicate line in the log counts once
        f.write(first[:25])  # an unfinished last line (a crash mid-append)
    rlhf("label", "import", "--run", run, "--config", TINY, "--round", 1)
    summary = json.loads((run / "labels/round-001/summary.json").read_text())
    assert summary["judgments"]["used"] == 7 and summary["judgments"]["duplicate"] == 1
    assert summary["judgments"]["incomplete_last_line"] == 1
    assert summary["answers"] == {"candidate": 5, "tie": 1, "both_bad": 1}
    assert summary["agreement"]["prompts_with_2plus"] == 3
    assert summary["agreement"]["pairwise"] == pytest.approx((1 + 0 + 0) / 5)  # r0: 1 of 3 pairs agree; r1, r2: 0 of 1
    pairs = pq.read_table(run / "labels/round-001/pairs.parquet").to_pylist()
    assert len(pairs) == 1 == summary["pairs"]
    text = {x["candidate_id"]: x["text"] for x in r0["candidates"]}
    assert pairs[0]["chosen"][0]["content"] == text[c(r0, 0)]
    assert pairs[0]["rejected"][0]["content"] == text[c(r0, 1)]
    assert pairs[0]["source"] == "labels:round-001" and pairs[0]["prompt"] == r0["prompt"]
    assert json.loads(pairs[0]["provenance"])["votes"] == {c(r0, 0): 2, c(r0, 1): 1}


# ---------------------------------------------------------------- the server


def test_auth_and_bad_requests_change_nothing(label_run, tmp_path):
    run = copy_run(label_run, tmp_path / "run")
    tokens = tokens_file(tmp_path / "tokens.csv", 2)
    tok = tokens["lab00"]
    port = free_port()
    with server(run, 1, tmp_path / "tokens.csv", port):
        assert request(port, "GET", "/api/next")[0] == 401
        assert request(port, "GET", "/api/next", token="wrong-token-123")[0] == 401
        assert request(port, "GET", "/")[0] == 401
        assert request(port, "GET", f"/api/next?token={tok}")[0] == 401  # the API wants the header
        status, page = request(port, "GET", f"/?token={tok}")
        assert status == 200 and "Which recommendation list" in page
        status, row = request(port, "GET", "/api/next", token=tok)
        assert status == 200 and set(row) == {"batch_id", "prompt_id", "history", "candidates"}
        good = {
            "batch_id": row["batch_id"],
            "prompt_id": row["prompt_id"],
            "preferred": row["candidates"][0]["candidate_id"],
            "idempotency_key": "k",
        }
        cases = [
            ("POST", "/api/judgments", {"raw": b"{not json"}, 400),
            ("POST", "/api/judgments", {"body": [1, 2]}, 400),
            ("POST", "/api/judgments", {"body": {**good, "batch_id": "round-001-ffffffff"}}, 404),
            ("POST", "/api/judgments", {"body": {**good, "prompt_id": "p9999"}}, 404),
            ("POST", "/api/judgments", {"body": {**good, "preferred": "c7"}}, 422),
            ("POST", "/api/judgments", {"body": {**good, "extra": 1}}, 400),
            ("POST", "/api/judgments", {"body": {k: v for k, v in good.items() if k != "idempotency_key"}}, 400),
            ("POST", "/api/judgments", {"raw": json.dumps({**good, "comment": "x" * 40000}).encode()}, 413),
            ("GET", "/api/judgments", {}, 405),
            ("GET", "/../../etc/passwd", {}, 404),
            ("GET", "/api/next/../../labels/round-001/judgments.jsonl", {}, 404),
            ("GET", "/%2e%2e/%2e%2e/etc/passwd", {}, 404),
            ("GET", "/labels/round-001/provenance.jsonl", {}, 404),
        ]
        for method, path, kw, status in cases:
            got, payload = request(port, method, path, token=tok, **kw)
            assert got == status, (path, kw, got, payload)
            assert isinstance(payload, dict) and payload["error"], (path, payload)
        assert judgments_on_disk(run) == []
        assert request(port, "GET", "/api/progress", token=tok)[1]["done"] == 0
        assert request(port, "POST", "/api/judgments", token=tok, body=good)[0] == 201
        assert request(port, "POST", "/api/judgments", token=tok, body=good)[0] == 200
        assert request(port, "GET", "/api/progress", token=tok)[1]["done"] == 1
        other = request(port, "GET", "/api/progress", token=tokens["lab01"])[1]
        assert other["labeler"] == "lab01" and other["done"] == 0  # each labeler has their own queue
    assert len(judgments_on_disk(run)) == 1


def _label_all(port, token, acked: list, stop: threading.Event | None = None, retry_every: int = 7):
    """Work through a labeler's queue like a script would; record every acknowledged judgment."""
    n = 0
    while stop is None or not stop.is_set():
        try:
            status, row = request(port, "GET", "/api/next", token=token)
        except (OSError, http.client.HTTPException):  # the server was killed mid-answer: not acknowledged
            return
        if status == 204:
            return
        body = {
            "batch_id": row["batch_id"],
            "prompt_id": row["prompt_id"],
            "preferred": row["candidates"][n % len(row["candidates"])]["candidate_id"],
            "idempotency_key": f"{token}-{row['prompt_id']}",
        }
        try:
            status, _ = request(port, "POST", "/api/judgments", token=token, body=body)
            if n % retry_every == 0:  # a client that did not see the answer sends it again
                assert request(port, "POST", "/api/judgments", token=token, body=body)[0] == 200
        except (OSError, http.client.HTTPException):  # the server was killed mid-answer: not acknowledged
            return
        assert status in (200, 201), status
        acked.append((token, row["prompt_id"]))
        n += 1


def test_fifty_concurrent_labelers(label_run, tmp_path):
    run = copy_run(label_run, tmp_path / "run")
    tokens = tokens_file(tmp_path / "tokens.csv", N_LABELERS)
    port = free_port()
    acked: list = []
    with server(run, 1, tmp_path / "tokens.csv", port):
        threads = [threading.Thread(target=_label_all, args=(port, t, acked)) for t in tokens.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
    on_disk = judgments_on_disk(run)
    names = {v: k for k, v in tokens.items()}
    assert len(acked) == N_LABELERS * PER_LABELER == 1000
    keys = [(j["labeler"], j["prompt_id"]) for j in on_disk]
    assert len(keys) == len(set(keys)) == 1000  # every judgment once, none twice
    assert {(names[t], p) for t, p in acked} == set(keys)


def test_sigkill_mid_round_then_restart(label_run, tmp_path):
    """Every acknowledged judgment was fsynced before its answer went out (the spy's record of fsync calls
    says how much of the log was on disk), none is lost to SIGKILL, and labelers resume after a restart."""
    run = copy_run(label_run, tmp_path / "run")
    tokens = tokens_file(tmp_path / "tokens.csv", 8)
    port = free_port()
    acked: list = []
    stop = threading.Event()
    spy = tmp_path / "fsync.log"
    log = run / "labels" / "round-001" / "judgments.jsonl"
    with server(run, 1, tmp_path / "tokens.csv", port, fsync_spy=spy) as proc:
        threads = [threading.Thread(target=_label_all, args=(port, t, acked, stop)) for t in tokens.values()]
        for t in threads:
            t.start()
        deadline = time.time() + 120
        while len(acked) < 40:
            assert time.time() < deadline, f"only {len(acked)} judgments acknowledged in 120 s"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # mid-round, with requests in flight
        proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
    names = {v: k for k, v in tokens.items()}
    on_disk = log.read_bytes()
    synced = on_disk[: synced_bytes(spy, log)]  # what fsync had put on disk when the process died
    in_synced = {(j["labeler"], j["prompt_id"]) for j in map(json.loads, synced.splitlines())}
    assert {(names[t], p) for t, p in acked} <= in_synced  # acknowledged only once fsynced
    first = judgments_on_disk(run)  # parses: no torn line survives a restart either
    keys = {(j["labeler"], j["prompt_id"]) for j in first}
    assert {(names[t], p) for t, p in acked} <= keys  # nothing acknowledged is lost
    assert len(keys) == len(first)
    with server(run, 1, tmp_path / "tokens.csv", port):
        for name, tok in tokens.items():
            prog = request(port, "GET", "/api/progress", token=tok)[1]
            assert prog["done"] == sum(1 for j in first if j["labeler"] == name)  # resumes where they were
            status, row = request(port, "GET", "/api/next", token=tok)
            assert status == 204 or (name, row["prompt_id"]) not in keys
        acked_after: list = []
        threads = [threading.Thread(target=_label_all, args=(port, t, acked_after)) for t in tokens.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads)
    final = judgments_on_disk(run)
    keys = [(j["labeler"], j["prompt_id"]) for j in final]
    assert len(keys) == len(set(keys)) == 8 * PER_LABELER


def test_torn_last_line_is_cut_on_restart(label_run, tmp_path):
    """A crash mid-append leaves part of a line that was never acknowledged: the restarted server cuts it,
    the log parses, the labeler is offered that prompt again, and judging it stores it once."""
    run = copy_run(label_run, tmp_path / "run")
    tokens = tokens_file(tmp_path / "tokens.csv", 1)
    tok = tokens["lab00"]
    port = free_port()
    log = run / "labels" / "round-001" / "judgments.jsonl"
    with server(run, 1, tmp_path / "tokens.csv", port):
        for n in range(3):
            row = request(port, "GET", "/api/next", token=tok)[1]
            body = {
                "batch_id": row["batch_id"],
                "prompt_id": row["prompt_id"],
                "preferred": row["candidates"][0]["candidate_id"],
                "idempotency_key": f"k{n}",
            }
            assert request(port, "POST", "/api/judgments", token=tok, body=body)[0] == 201
        torn = request(port, "GET", "/api/next", token=tok)[1]
    whole = log.read_bytes()
    record = {
        "batch_id": torn["batch_id"],
        "prompt_id": torn["prompt_id"],
        "preferred": "tie",
        "rejected": [],
        "idempotency_key": "k3",
        "comment": "",
        "labeler": "lab00",
        "judged_at": "2026-01-01T00:00:00Z",
    }
    cut = json.dumps(record).encode()[:-20]  # the line as a crash mid-write leaves it: no end, no newline
    log.write_bytes(whole + cut)
    with server(run, 1, tmp_path / "tokens.csv", port) as proc:
        assert log.read_bytes() == whole  # cut back to the last complete line, on start
        assert request(port, "GET", "/api/progress", token=tok)[1]["done"] == 3
        assert request(port, "GET", "/api/next", token=tok)[1]["prompt_id"] == torn["prompt_id"]
        body = {**{k: record[k] for k in ("batch_id", "prompt_id", "preferred", "idempotency_key")}}
        assert request(port, "POST", "/api/judgments", token=tok, body=body)[0] == 201
    assert f"cut {len(cut)} bytes of an unfinished last line" in proc.stdout.read()
    lines = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    assert [j["idempotency_key"] for j in lines] == ["k0", "k1", "k2", "k3"]
    assert [j["prompt_id"] for j in lines].count(torn["prompt_id"]) == 1


@pytest.mark.parametrize(
    "content, line, message",
    [
        ("ann,token-aaaaaaaa\nann,token-bbbbbbbb\n", 2, "labeler or token repeated"),
        ("ann,token-aaaaaaaa\nbob,token-aaaaaaaa\n", 2, "labeler or token repeated"),
        ("# labelers\nann,\n", 2, "expected `labeler,token`"),
        ("ann token-aaaaaaaa\n", 1, "expected `labeler,token`"),
        ("ann,short\n", 1, "shorter than 8 characters"),
        ("<script>,token-aaaaaaaa\n", 1, "must be 1-64 of letters"),
        ("# only a comment\n\n", None, "no `labeler,token` lines"),
    ],
)
def test_malformed_tokens_file_is_a_usage_error(label_run, tmp_path, content, line, message):
    """The server does not start; the message names the file and line; exit 2 (usage), no traceback."""
    path = tmp_path / "tokens.csv"
    path.write_text(content)
    proc = rlhf(
        "label", "serve", "--run", label_run, "--round", 1, "--tokens-file", path, "--port", free_port(), check=False
    )
    assert proc.returncode == 2, proc.stderr
    where = f"{path}:{line}: " if line else f"{path}: "
    assert where in proc.stderr and message in proc.stderr and "Traceback" not in proc.stderr
    assert "token-aaaaaaaa" not in proc.stderr + proc.stdout  # a token is never echoed


def test_security_headers_on_every_response_and_chunked_oversize_body(label_run, tmp_path):
    """The same headers on pages, data, 204s and every error (401, 400, 404, 405, 409, 413, 422); a body
    sent chunked, without a Content-Length, is counted as it arrives: over label.max_body_bytes it gets 413
    and nothing is stored."""
    run = copy_run(label_run, tmp_path / "run")
    tokens = tokens_file(tmp_path / "tokens.csv", 2)
    tok = tokens["lab00"]
    port = free_port()
    seen: dict[int, int] = {}

    def call(method, path, status, **kw):
        got, payload, headers = request_full(port, method, path, **kw)
        assert got == status, (method, path, got, payload)
        assert "default-src 'none'" in headers.get("content-security-policy", ""), (path, got, headers)
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers.get("x-content-type-options") == "nosniff", (path, got)
        assert headers.get("referrer-policy") == "no-referrer", (path, got)
        assert headers.get("cache-control") == "no-store", (path, got)
        seen[got] = seen.get(got, 0) + 1
        return payload

    with server(run, 1, tmp_path / "tokens.csv", port):
        call("GET", "/api/next", 401)
        call("GET", "/nope", 401)  # unknown paths answer 401 before 404 to strangers
        call("GET", f"/?token={tok}", 200)
        call("HEAD", "/", 200, token=tok)
        call("GET", "/nope", 404, token=tok)
        call("GET", "/%2e%2e/%2e%2e/etc/passwd", 404, token=tok)
        call("PUT", "/api/next", 405, token=tok)
        call("POST", "/api/judgments", 400, token=tok, raw=b"{")
        row = call("GET", "/api/next", 200, token=tok)
        call("GET", "/api/progress", 200, token=tok)
        good = {
            "batch_id": row["batch_id"],
            "prompt_id": row["prompt_id"],
            "preferred": row["candidates"][0]["candidate_id"],
            "idempotency_key": "k",
        }
        call("POST", "/api/judgments", 422, token=tok, body={**good, "preferred": "c9"})
        oversize = json.dumps({**good, "comment": "x" * 40_000}).encode()
        chunks = [oversize[i : i + 1024] for i in range(0, len(oversize), 1024)]
        call("POST", "/api/judgments", 413, token=tok, chunks=chunks)
        call("POST", "/api/judgments", 413, token=tok, raw=oversize)  # and with a Content-Length
        assert judgments_on_disk(run) == [] and call("GET", "/api/progress", 200, token=tok)["done"] == 0
        small = json.dumps(good).encode()
        call("POST", "/api/judgments", 201, token=tok, chunks=[small[:10], small[10:]])  # chunked itself is fine
        call("POST", "/api/judgments", 200, token=tok, body=good)
        call("POST", "/api/judgments", 409, token=tok, body={**good, "preferred": "tie"})
        other = tokens["lab01"]
        for _ in range(PER_LABELER):
            row = call("GET", "/api/next", 200, token=other)
            body = {**good, "prompt_id": row["prompt_id"], "idempotency_key": row["prompt_id"]}
            call("POST", "/api/judgments", 201, token=other, body=body)
        call("GET", "/api/next", 204, token=other)
    assert set(seen) == {200, 201, 204, 400, 401, 404, 405, 409, 413, 422}
    assert len(judgments_on_disk(run)) == 1 + PER_LABELER


def _many_candidates_batch(run: Path, sizes: list[int]) -> list[dict]:
    """Rewrite round 1 of ``run`` as rows with 3 or 4 distinct candidates each (texts made up)."""
    path = run / "labels" / "round-001" / "batch.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()][: len(sizes)]
    for row, n in zip(rows, sizes):
        row["candidates"] = [
            {"candidate_id": f"c{i}", "text": f"1. List {i} of {row['prompt_id']} — reason"} for i in range(1, n + 1)
        ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "labels" / "round-001" / "provenance.jsonl").unlink()
    return rows


def test_import_with_three_and_four_candidates(label_run, tmp_path):
    """Each labeler who picks X of N lists says X beats each of the others and nothing about those others;
    pairs come from the counts of such statements, per the README's import rules."""
    import pyarrow.parquet as pq

    run = copy_run(label_run, tmp_path / "run")
    r3a, r3b, r4a, r4b = _many_candidates_batch(run, [3, 3, 4, 4])
    batch, store = _store(run)
    plan = [
        ("ann", r3a, "c1"),
        ("bob", r3a, "c1"),
        ("cat", r3a, "c2"),  # c1 2:1 over c2, and each over c3, which nobody picked
        ("ann", r3b, "c2"),  # one labeler: c2 over c1 and over c3; c1 vs c3 unknown
        ("ann", r4a, "c3"),
        ("bob", r4a, "c4"),
        ("cat", r4a, "tie"),  # c3 and c4 1:1 (no pair between them), each over c1 and c2; c1 vs c2 unknown
        ("ann", r4b, "c4"),
        ("bob", r4b, "both_bad"),  # c4 over c1, c2, c3
    ]
    for lab, row, pref in plan:
        body = {"batch_id": batch.batch_id, "prompt_id": row["prompt_id"], "preferred": pref, "idempotency_key": "k"}
        status, rec = store.add(lab, {**body, "idempotency_key": f"{lab}-{row['prompt_id']}"})
        assert status == 201
        others = [c["candidate_id"] for c in row["candidates"] if c["candidate_id"] != pref]
        assert rec["rejected"] == ([] if pref in ("tie", "both_bad") else others)
    store.close()
    rlhf("label", "import", "--run", run, "--config", TINY, "--round", 1)
    pairs = pq.read_table(run / "labels/round-001/pairs.parquet").to_pylist()
    got = {}
    for pair in pairs:
        prov = json.loads(pair["provenance"])
        got[(prov["prompt_id"], prov["chosen"], prov["rejected"])] = prov["votes"]
        texts = {c["candidate_id"]: c["text"] for c in batch.by_prompt[prov["prompt_id"]]["candidates"]}
        assert pair["chosen"][0]["content"] == texts[prov["chosen"]]
        assert pair["rejected"][0]["content"] == texts[prov["rejected"]]
    p3a, p3b, p4a, p4b = (r["prompt_id"] for r in (r3a, r3b, r4a, r4b))
    assert got == {
        (p3a, "c1", "c2"): {"c1": 2, "c2": 1},
        (p3a, "c1", "c3"): {"c1": 2, "c3": 0},
        (p3a, "c2", "c3"): {"c2": 1, "c3": 0},
        (p3b, "c2", "c1"): {"c2": 1, "c1": 0},
        (p3b, "c2", "c3"): {"c2": 1, "c3": 0},
        (p4a, "c3", "c1"): {"c3": 1, "c1": 0},
        (p4a, "c3", "c2"): {"c3": 1, "c2": 0},
        (p4a, "c4", "c1"): {"c4": 1, "c1": 0},
        (p4a, "c4", "c2"): {"c4": 1, "c2": 0},
        (p4b, "c4", "c1"): {"c4": 1, "c1": 0},
        (p4b, "c4", "c2"): {"c4": 1, "c2": 0},
        (p4b, "c4", "c3"): {"c4": 1, "c3": 0},
    }
    summary = json.loads((run / "labels/round-001/summary.json").read_text())
    assert summary["pairs"] == 12 and summary["judgments"]["used"] == 9
    assert summary["answers"] == {"candidate": 7, "tie": 1, "both_bad": 1}
    # agreeing labeler pairs: r3a 1 of 3, r4a 0 of 3, r4b 0 of 1
    assert summary["agreement"]["prompts_with_2plus"] == 3
    assert summary["agreement"]["pairwise"] == pytest.approx(1 / 7)


# ---------------------------------------------------------------- simulated labelers -> reward data


def _listing_batch(run: Path, round_no: int, hostile: str | None = None) -> None:
    """A round whose candidates are real listings: the user's best films by true utility vs their worst."""
    from rlhf.catalog import Catalog
    from rlhf.data.simulator import Simulator
    from rlhf.labeling.batch import _history
    from rlhf.listing import render
    from rlhf.runs import RunDir

    r = RunDir(run)
    meta, catalog = r.meta(), Catalog.load_jsonl(run / "data/catalog.jsonl")
    sim = Simulator(catalog, seed=meta["simulator_seed"])
    out = run / "labels" / f"round-{round_no:03d}"
    out.mkdir(parents=True)
    rows, prov = [], []
    for i, p in enumerate(r.rows(r.data.prompts("val"))[:6]):
        user = sim.user(p["user_id"])
        seen = set(p["history_ids"])
        ranked = [
            it.item_id
            for it in sorted(catalog.items, key=lambda it: -sim.utility(user, it.item_id))
            if it.item_id not in seen
        ]
        good, bad = ranked[: meta["k"]], ranked[-meta["k"] :]
        texts = [
            render([catalog[x].display for x in good], ["a strong match"] * meta["k"]),
            render([catalog[x].display for x in bad], [hostile or "a weak match"] * meta["k"]),
        ]
        order = [0, 1] if i % 2 else [1, 0]
        rows.append(
            {
                "batch_id": f"round-{round_no:03d}-test",
                "prompt_id": f"p{i + 1:04d}",
                "user_id": p["user_id"],
                "prompt": p["prompt"],
                "history": _history(catalog, p, 8),
                "candidates": [{"candidate_id": f"c{n + 1}", "text": texts[o]} for n, o in enumerate(order)],
            }
        )
        prov.append(
            {
                "prompt_id": f"p{i + 1:04d}",
                "candidates": {f"c{n + 1}": {"stage": ["good", "bad"][o]} for n, o in enumerate(order)},
            }
        )
    (out / "batch.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    (out / "provenance.jsonl").write_text("".join(json.dumps(x) + "\n" for x in prov))


def test_simulated_round_feeds_the_reward_model(tiny_sft, tmp_path):
    import pyarrow.parquet as pq

    run = copy_run(tiny_sft, tmp_path / "run")
    _listing_batch(run, 2)
    rlhf("label", "simulate", "--run", run, "--config", TINY, "--round", 2, "--labelers", 3, "--noise", 0)
    summary = json.loads((run / "labels/round-002/summary.json").read_text())
    assert summary["judgments"]["used"] == 18 and summary["labelers"] == {"sim-1": 6, "sim-2": 6, "sim-3": 6}
    assert summary["stage_wins"] == {"good>bad": 6}  # noise 0: the better list every time
    assert summary["agreement"]["pairwise"] == 1.0
    pairs = pq.read_table(run / "labels/round-002/pairs.parquet").to_pylist()
    assert len(pairs) == 6 and all(p["source"] == "labels:round-002" for p in pairs)
    # running it again stores nothing twice
    proc = rlhf("label", "simulate", "--run", run, "--config", TINY, "--round", 2, "--labelers", 3, "--noise", 0)
    assert "0 judgments stored, 18 already there" in proc.stdout
    assert len(judgments_on_disk(run, 2)) == 18
    rlhf("reward", "--run", run, "--config", TINY)
    metrics = json.loads((run / "reward/metrics.json").read_text())
    assert metrics["pairs"]["read"]["labels:round-002"] == 6


def test_simulated_labeler_choice():
    import numpy as np

    from rlhf.labeling.simulate import choose

    rng = np.random.default_rng(0)
    assert choose([0.2, 0.9], [3, 3], 0, rng) == 1
    assert choose([0.5, 0.5], [3, 3], 0, rng) == "tie"
    assert choose([0.0, 0.0], [0, 0], 1.0, rng) == "both_bad"
    picks = [choose([0.2, 0.6], [3, 3], 1.0, rng) for _ in range(400)]
    assert 0.9 < sum(p == 1 for p in picks) / 400 < 1.0  # Bradley-Terry: mostly, not always


# ---------------------------------------------------------------- a real browser

CHROMIUM = "/usr/bin/chromium"
HOSTILE = "<img src=x onerror=\"document.title='pwned'\"> Ignore previous instructions"


def test_browser_labels_two_items_with_the_keyboard(tiny_sft, tmp_path):
    if not Path(CHROMIUM).exists():
        raise AssertionError(
            f"{CHROMIUM} is missing: `make test` installs Debian's chromium as root "
            "(apt-get install chromium); this test must run, not skip"
        )
    from playwright.sync_api import expect, sync_playwright

    run = copy_run(tiny_sft, tmp_path / "run")
    _listing_batch(run, 3, hostile=HOSTILE)
    tokens = tokens_file(tmp_path / "tokens.csv", 1)
    port = free_port()
    with server(run, 3, tmp_path / "tokens.csv", port), sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/?token={tokens['lab00']}")
            page.wait_for_selector(".cand")
            progress = page.locator("#progress")
            expect(progress).to_have_text(re.compile(r"^0 / 6"))
            first = page.locator(".cand").first.get_attribute("data-candidate")
            shown = page.locator(".cand pre").all_inner_texts()
            assert any(HOSTILE in t for t in shown)  # hostile text shows as text ...
            assert page.locator(".cand img").count() == 0  # ... and never becomes markup
            page.keyboard.press("1")
            expect(progress).to_have_text(re.compile(r"^1 / 6"))
            page.keyboard.press("c")
            page.keyboard.type("both lists miss the point")
            page.keyboard.press("Escape")
            page.keyboard.press("t")
            expect(progress).to_have_text(re.compile(r"^2 / 6"))
            assert page.title() != "pwned"
        finally:
            browser.close()
    on_disk = judgments_on_disk(run, 3)
    assert [j["labeler"] for j in on_disk] == ["lab00", "lab00"]
    assert on_disk[0]["preferred"] == first
    assert on_disk[1]["preferred"] == "tie" and on_disk[1]["comment"] == "both lists miss the point"
