"""One labeling round served until it is judged: what `rlhf rounds --labelers people` waits on.

The server of `rlhf label serve` (the same app, store and tokens) runs in a thread of this process, so it stops with
it: when the round's queue is judged, when ``rounds.deadline_s`` seconds of serving have passed, when the stop file
appears (`rlhf rounds --run R --stop`), or on Ctrl-C / SIGTERM (the caller's KeyboardInterrupt), the server is told to
exit and its thread joined before this returns or raises. Every acknowledged judgment is already on disk (the store
fsyncs before answering), so stopping loses nothing; serving the round again picks up where its labelers left off.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf.labeling import round_files
from rlhf.labeling.batch import Batch
from rlhf.labeling.server import announce, make_app
from rlhf.labeling.store import JudgmentStore

PROG = "rounds"


@dataclass
class Judging:
    """How a served round ended: ``why`` is judged | deadline | stop."""

    why: str
    judgments: int
    prompts_judged: int
    prompts: int
    seconds: float


class ServerFailed(OSError):
    """The labeling server could not start (e.g. the port is taken); the message says which address."""


def queue_judged(store: JudgmentStore, labelers: list[str], per_prompt: int) -> bool:
    """Every prompt has ``per_prompt`` judgments; with 0, every labeler has judged their whole queue."""
    if per_prompt:
        counts = Counter(j["prompt_id"] for j in store.judgments())
        return all(counts[r["prompt_id"]] >= per_prompt for r in store.batch.rows)
    return all(store.progress(name)["remaining"] == 0 for name in labelers)


def serve_until_judged(
    cfg, run_dir: Path, round_no: int, tokens: dict[str, str], stop_file: Path, from_file: bool = False, poll_s=0.25
) -> Judging:
    """Serve labels/round-NNN on label.host:label.port until the queue is judged (rounds.judgments_per_prompt), the
    deadline (rounds.deadline_s) or the stop file; the server has stopped when this returns (or raises)."""
    import uvicorn

    lc, rc = cfg.label, cfg.rounds
    batch = Batch.load(run_dir, round_no)
    store = JudgmentStore(round_files(run_dir, round_no).judgments, batch)
    app = make_app(store, tokens, lc.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=lc.host, port=lc.port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, name="labeling-server", daemon=True)
    t0 = time.monotonic()
    thread.start()
    try:
        _wait_started(server, thread, lc)
        print(f"{PROG}: serving {batch.batch_id}: {len(batch.rows)} prompts, {len(store.judgments())} judgments so far")
        announce(PROG, lc, tokens, from_file)
        why = _wait(store, sorted(set(tokens.values())), rc, stop_file, t0, poll_s)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        store.close()
    judged = store.judgments()
    return Judging(why, len(judged), len({j["prompt_id"] for j in judged}), len(batch.rows), time.monotonic() - t0)


def _wait_started(server, thread: threading.Thread, lc, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise ServerFailed(
                f"the labeling server could not listen on {lc.host}:{lc.port} (is the port taken? set label.port)"
            )
        time.sleep(0.05)


def _wait(store: JudgmentStore, labelers: list[str], rc, stop_file: Path, t0: float, poll_s: float) -> str:
    while True:
        if queue_judged(store, labelers, rc.judgments_per_prompt):
            return "judged"
        if stop_file.exists():
            stop_file.unlink(missing_ok=True)  # consumed: the next round is served in full
            return "stop"
        if rc.deadline_s and time.monotonic() - t0 >= rc.deadline_s:
            return "deadline"
        time.sleep(poll_s)
