"""The run directory contract: where each stage's artifacts live, and clear errors when one is missing."""

from __future__ import annotations

import json
import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (the directory entry itself is flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class MissingInput(FileNotFoundError):
    """A stage's input is absent; the message names the command that makes it."""


MAKERS = {
    "data": "rlhf data prepare --out {run}",
    "sft": "rlhf sft --run {run}",
    "reward": "rlhf reward --run {run}",
    "ppo": "rlhf ppo --run {run}",
}


class RunDir:
    def __init__(self, path):
        self.root = Path(path)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def require(self, stage: str, path: Path) -> Path:
        if not path.exists():
            raise MissingInput(f"{path} is missing; make it with: {MAKERS[stage].format(run=self.root)}")
        return path

    def meta(self) -> dict:
        return json.loads(self.require("data", self.data / "meta.json").read_text())

    def summary(self) -> dict:
        """What the data stage counted (users, items, interactions, rows per artifact)."""
        return json.loads(self.require("data", self.data / "summary.json").read_text())

    def catalog(self):
        from rlhf.catalog import Catalog

        return Catalog.load_jsonl(self.require("data", self.data / "catalog.jsonl"))

    def rows(self, relative: str) -> list[dict]:
        import pyarrow.parquet as pq

        path = self.require("data", self.data / relative)
        table = pq.read_table(path)
        return [] if table.column_names == ["empty"] else table.to_pylist()

    def done(self, stage: str) -> bool:
        marker = {
            "data": self.data / "summary.json",
            "sft": self.root / "sft" / "merged" / "config.json",
            "reward": self.root / "reward" / "metrics.json",
            "ppo": self.root / "ppo" / "adapter" / "adapter_config.json",
            "eval": self.root / "eval" / "metrics.json",
        }[stage]
        return marker.exists()
