"""The judgment log of a round: one JSON line per decision, appended and fsynced before it is acknowledged.

Guarantees, relied on by the server, the simulator and import:
- `add` returns only after the line is on disk (write, flush, fsync), so an acknowledged judgment survives
  a crash or SIGKILL;
- a repeat of an idempotency key (per labeler) returns the stored judgment with status 200 and writes
  nothing; the same key with a different body is refused (409); a second judgment of the same prompt by
  the same labeler under a new key is refused (409), so nothing is counted twice;
- on start, a last line cut short by a crash (never acknowledged, since the fsync had not returned) is
  cut off the file, so the log always parses.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import numpy as np

from rlhf.data.loaders import DataError
from rlhf.labeling.batch import SPECIAL, Batch
from rlhf.runs import fsync_dir

MAX_KEY, MAX_COMMENT = 128, 2000


class JudgmentError(ValueError):
    """A judgment the store refuses; ``status`` is the HTTP status the server answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class JudgmentStore:
    def __init__(self, path: Path, batch: Batch):
        self.path, self.batch = Path(path), batch
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str], dict] = {}
        self._done: dict[str, dict[str, dict]] = {}
        self._orders: dict[str, list[str]] = {}
        self.recovered_bytes = self._recover()
        self._fh = open(self.path, "ab")

    def _recover(self) -> int:
        """Read the log back; cut an unfinished last line. Returns the bytes cut."""
        if not self.path.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            fsync_dir(self.path.parent)
            return 0
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        cut = len(data) - end
        if cut:
            with open(self.path, "r+b") as f:
                f.truncate(end)
                f.flush()
                os.fsync(f.fileno())
        for n, line in enumerate(data[:end].splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                self._index(rec)
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{self.path}:{n}: unreadable judgment ({e}); the log was edited by hand?") from None
        return cut

    def _index(self, rec: dict) -> None:
        self._by_key[(rec["labeler"], rec["idempotency_key"])] = rec
        self._done.setdefault(rec["labeler"], {})[rec["prompt_id"]] = rec

    def close(self) -> None:
        self._fh.close()

    # ---- reading
    def order(self, labeler: str) -> list[str]:
        """The labeler's own queue: every prompt, in an order fixed by the batch and the labeler's name."""
        if labeler not in self._orders:
            seed = int(hashlib.sha256(f"{self.batch.batch_id}/{labeler}".encode()).hexdigest()[:16], 16)
            ids = [r["prompt_id"] for r in self.batch.rows]
            self._orders[labeler] = [ids[i] for i in np.random.default_rng(seed).permutation(len(ids))]
        return self._orders[labeler]

    def next_for(self, labeler: str) -> dict | None:
        done = self._done.get(labeler, {})
        for pid in self.order(labeler):
            if pid not in done:
                return self.batch.by_prompt[pid]
        return None

    def progress(self, labeler: str) -> dict:
        done = len(self._done.get(labeler, {}))
        total = len(self.batch.rows)
        return {
            "labeler": labeler,
            "batch_id": self.batch.batch_id,
            "done": done,
            "total": total,
            "remaining": total - done,
        }

    def judgments(self) -> list[dict]:
        with self._lock:
            return [r for per in self._done.values() for r in per.values()]

    # ---- writing
    def validate(self, payload) -> dict:
        """The judgment's fields, checked against the batch; raises JudgmentError (4xx) naming the field."""
        if not isinstance(payload, dict):
            raise JudgmentError(400, "the body must be a JSON object")
        unknown = set(payload) - {"batch_id", "prompt_id", "preferred", "idempotency_key", "comment"}
        if unknown:
            raise JudgmentError(400, f"unknown field(s) {sorted(unknown)}")
        for f in ("batch_id", "prompt_id", "preferred", "idempotency_key"):
            if not isinstance(payload.get(f), str) or not payload[f]:
                raise JudgmentError(400, f"field {f!r} is required and must be a non-empty string")
        if payload["batch_id"] != self.batch.batch_id:
            raise JudgmentError(
                404, f"unknown batch_id {payload['batch_id'][:80]!r}; this round serves {self.batch.batch_id}"
            )
        row = self.batch.by_prompt.get(payload["prompt_id"])
        if row is None:
            raise JudgmentError(404, f"unknown prompt_id {payload['prompt_id'][:80]!r} in batch {self.batch.batch_id}")
        ids = [c["candidate_id"] for c in row["candidates"]]
        if payload["preferred"] not in (*ids, *SPECIAL):
            raise JudgmentError(422, f"preferred={payload['preferred'][:80]!r} is not one of {ids + list(SPECIAL)}")
        if len(payload["idempotency_key"]) > MAX_KEY:
            raise JudgmentError(422, f"idempotency_key is longer than {MAX_KEY} characters")
        comment = payload.get("comment") or ""
        if not isinstance(comment, str) or len(comment) > MAX_COMMENT:
            raise JudgmentError(422, f"comment must be a string of at most {MAX_COMMENT} characters")
        pref = payload["preferred"]
        return {
            "batch_id": payload["batch_id"],
            "prompt_id": payload["prompt_id"],
            "preferred": pref,
            "rejected": [] if pref in SPECIAL else [i for i in ids if i != pref],
            "idempotency_key": payload["idempotency_key"],
            "comment": comment,
        }

    def add(self, labeler: str, payload) -> tuple[int, dict]:
        """Store one judgment durably: (201, record) when new, (200, record) for a repeated key."""
        fields = self.validate(payload)
        with self._lock:
            old = self._by_key.get((labeler, fields["idempotency_key"]))
            if old is not None:
                if any(old[k] != v for k, v in fields.items()):
                    raise JudgmentError(409, "idempotency_key was already used for a different judgment")
                return 200, old
            prior = self._done.get(labeler, {}).get(fields["prompt_id"])
            if prior is not None:
                raise JudgmentError(409, f"you already judged {fields['prompt_id']} (key {prior['idempotency_key']!r})")
            rec = {**fields, "labeler": labeler, "judged_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
            try:
                self._fh.write(line)
                self._fh.flush()
                os.fsync(self._fh.fileno())
            except OSError:
                # an unfinished line would corrupt the next append: cut back to the last complete one
                self._fh.close()
                self.recovered_bytes += self._recover()
                self._fh = open(self.path, "ab")
                raise
            self._index(rec)
            return 201, rec
