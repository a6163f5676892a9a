"""The run directory: the only place that knows its layout. Every stage reads and writes artifacts through it.

    runs/<name>/
      config.yaml           the run's resolved config (every section; each stage rewrites its own)
      data/                 catalog, interactions, splits, meta, summary, sft/, pairs/, prompts/
      sft/                  adapter/, merged/, samples.jsonl, metrics.json, log.jsonl
      reward/               model/, adapter/, metrics.json, log.jsonl
      ppo/                  adapter/, checkpoints/ (PPO), trainer/checkpoint-N/ (GRPO, RLOO), metrics.jsonl,
                            rollouts.jsonl, samples.jsonl, summary.json (any RL algorithm: rlhf/rl.py)
      eval/                 metrics.json, listings.jsonl, report.md, report.html, plots/
      labels/round-NNN/     batch.jsonl, provenance.jsonl, manifest.json, judgments.jsonl, pairs.parquet, summary.json
      rounds/               `rlhf rounds`: state.json (finished steps), STOP (close the judging), round-NNN/{reward,
                            ppo,eval}/ (each round's reward model, RL adapter and eval, kept; round-000: the start)
      logs/                 tensorboard/<stage>/, trackio/ (its local store), wandb/ (offline runs): track.report_to

A missing input is a ``MissingInput`` that names the command making it (``RunDir.need``). A stage is done when
the files it writes last are there and readable, interrupted when its folder holds anything less
(``RunDir.state``).
"""

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


def atomic_write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a fsynced temporary file and a rename: readers see the old file or the
    new one, never half of one."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary file of its own per writer: two processes saving the same file at once must not share one
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600: the run's files stay readable as before
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    fsync_dir(path.parent)
    return path


class MissingInput(FileNotFoundError):
    """A stage's input is absent; the message names the command that makes it."""


class _Part:
    """One stage's folder; subclasses name its files."""

    def __init__(self, folder: Path):
        self.dir = folder


class DataFiles(_Part):
    meta = property(lambda self: self.dir / "meta.json")
    summary = property(lambda self: self.dir / "summary.json")
    catalog = property(lambda self: self.dir / "catalog.jsonl")
    interactions = property(lambda self: self.dir / "interactions.parquet")
    splits = property(lambda self: self.dir / "splits.jsonl")
    pairs_dir = property(lambda self: self.dir / "pairs")

    def sft(self, split: str) -> Path:
        return self.dir / "sft" / f"{split}.parquet"

    def prompts(self, split: str) -> Path:
        return self.dir / "prompts" / f"{split}.parquet"

    def pairs(self, source: str) -> Path:
        return self.pairs_dir / f"{source}.parquet"


class SFTFiles(_Part):
    adapter = property(lambda self: self.dir / "adapter")
    merged = property(lambda self: self.dir / "merged")
    samples = property(lambda self: self.dir / "samples.jsonl")
    metrics = property(lambda self: self.dir / "metrics.json")
    log = property(lambda self: self.dir / "log.jsonl")
    trainer = property(lambda self: self.dir / "trainer")


class RewardFiles(_Part):
    model = property(lambda self: self.dir / "model")
    behaviour = property(lambda self: self.dir / "behaviour.npz")
    weights = property(lambda self: self.dir / "weights.json")
    adapter = property(lambda self: self.dir / "adapter")
    metrics = property(lambda self: self.dir / "metrics.json")
    log = property(lambda self: self.dir / "log.jsonl")
    trainer = property(lambda self: self.dir / "trainer")


class PPOFiles(_Part):
    adapter = property(lambda self: self.dir / "adapter")
    checkpoints = property(lambda self: self.dir / "checkpoints")
    metrics = property(lambda self: self.dir / "metrics.jsonl")
    rollouts = property(lambda self: self.dir / "rollouts.jsonl")
    samples = property(lambda self: self.dir / "samples.jsonl")
    summary = property(lambda self: self.dir / "summary.json")
    trainer = property(lambda self: self.dir / "trainer")


class EvalFiles(_Part):
    metrics = property(lambda self: self.dir / "metrics.json")
    listings = property(lambda self: self.dir / "listings.jsonl")
    report_md = property(lambda self: self.dir / "report.md")
    report_html = property(lambda self: self.dir / "report.html")
    plots = property(lambda self: self.dir / "plots")


class RoundFiles(_Part):
    batch = property(lambda self: self.dir / "batch.jsonl")
    provenance = property(lambda self: self.dir / "provenance.jsonl")
    manifest = property(lambda self: self.dir / "manifest.json")
    judgments = property(lambda self: self.dir / "judgments.jsonl")
    pairs = property(lambda self: self.dir / "pairs.parquet")
    summary = property(lambda self: self.dir / "summary.json")


class LogFiles(_Part):
    """Where each experiment tracker writes (rlhf/tracking.py)."""

    trackio = property(lambda self: self.dir / "trackio")  # trackio's local store: one SQLite file per project
    wandb = property(lambda self: self.dir / "wandb")  # wandb's offline runs, under wandb/offline-run-*

    def tensorboard(self, stage: str) -> Path:
        return self.dir / "tensorboard" / stage


def round_name(round_no: int) -> str:
    return f"round-{round_no:03d}"


class RoundSnapshot(_Part):
    """What one round of `rlhf rounds` kept: copies of reward/, ppo/ and eval/ as the round left them."""

    reward = property(lambda self: RewardFiles(self.dir / "reward"))
    ppo = property(lambda self: PPOFiles(self.dir / "ppo"))
    eval = property(lambda self: EvalFiles(self.dir / "eval"))


class RoundsFiles(_Part):
    """`rlhf rounds`: its resume record, the stop file and each round's snapshot (round 0: where the loop began)."""

    state = property(lambda self: self.dir / "state.json")
    stop = property(lambda self: self.dir / "STOP")

    def round(self, round_no: int) -> RoundSnapshot:
        return RoundSnapshot(self.dir / round_name(round_no))


class LabelFiles(_Part):
    def round(self, round_no: int) -> RoundFiles:
        return RoundFiles(self.dir / round_name(round_no))

    def imported_pairs(self) -> list[Path]:
        """Every imported round's pairs, in round order."""
        return sorted(self.dir.glob("round-*/pairs.parquet"))


STAGES = ("data", "sft", "reward", "ppo", "eval")

# the command that makes each part, for MissingInput messages
MAKERS = {
    "data": "rlhf data prepare --out {run}",
    "sft": "rlhf sft --run {run}",
    "reward": "rlhf reward --run {run}",
    "ppo": "rlhf ppo --run {run}",
    "eval": "rlhf eval --run {run}",
    "labels": "rlhf label export --run {run} --round N",
    "rounds": "rlhf rounds --run {run} --rounds N",
}


class RunDir:
    def __init__(self, path):
        self.root = Path(path)
        self.config = self.root / "config.yaml"
        self.pipeline = self.root / "pipeline.json"
        self.data = DataFiles(self.root / "data")
        self.sft = SFTFiles(self.root / "sft")
        self.reward = RewardFiles(self.root / "reward")
        self.ppo = PPOFiles(self.root / "ppo")
        self.eval = EvalFiles(self.root / "eval")
        self.labels = LabelFiles(self.root / "labels")
        self.logs = LogFiles(self.root / "logs")
        self.rounds = RoundsFiles(self.root / "rounds")

    def need(self, path: Path) -> Path:
        """``path`` when it exists; otherwise a MissingInput naming the command that makes it."""
        path = Path(path)
        if path.exists():
            return path
        try:
            part = path.relative_to(self.root).parts[0]
        except ValueError:
            part = ""
        maker = MAKERS.get(part)
        hint = f"; make it with: {maker.format(run=self.root)}" if maker else ""
        raise MissingInput(f"{path} is missing{hint}")

    def meta(self) -> dict:
        return json.loads(self.need(self.data.meta).read_text())

    def summary(self) -> dict:
        """What the data stage counted (users, items, interactions, rows per artifact)."""
        return json.loads(self.need(self.data.summary).read_text())

    def catalog(self):
        from rlhf.catalog import Catalog

        return Catalog.load_jsonl(self.need(self.data.catalog))

    def rows(self, path: Path) -> list[dict]:
        """The rows of one of the data stage's parquet files (an empty set is a file with a lone 'empty' column)."""
        import pyarrow.parquet as pq

        table = pq.read_table(self.need(path))
        return [] if table.column_names == ["empty"] else table.to_pylist()

    def finals(self, stage: str) -> list[Path]:
        """The files a stage writes last: all there (the JSON ones readable) means the stage finished."""
        return {
            "data": [self.data.summary],
            "sft": [self.sft.merged / "config.json", self.sft.metrics],
            "reward": [self.reward.model / "config.json", self.reward.metrics],
            "ppo": [self.ppo.adapter / "adapter_config.json", self.ppo.summary],
            "eval": [self.eval.metrics, self.eval.report_html],
        }[stage]

    def unfinished(self, stage: str) -> list[Path]:
        """The stage's last files that are absent or half-written."""
        return [p for p in self.finals(stage) if not _complete(p)]

    def state(self, stage: str) -> str:
        """done | interrupted (the stage's folder holds something, not all of it) | missing."""
        if not self.unfinished(stage):
            return "done"
        folder = getattr(self, stage).dir
        return "interrupted" if folder.is_dir() and any(folder.iterdir()) else "missing"

    def done(self, stage: str) -> bool:
        return self.state(stage) == "done"


def _complete(path: Path) -> bool:
    if path.suffix != ".json":
        return path.exists()
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True
