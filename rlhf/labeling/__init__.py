"""Offline preference-labeling rounds.

    rlhf label export   --run RUN --round 1 [--prompts 20] [--candidates 2] [--stages sft,ppo]
    rlhf label serve    --run RUN --round 1 [--tokens-file labelers.csv]   # a page on 127.0.0.1
    rlhf label simulate --run RUN --round 1 [--labelers 3] [--noise 1.0]   # built-in data: no people needed
    rlhf label import   --run RUN --round 1                                # -> labels/round-001/pairs.parquet
    rlhf reward         --run RUN                                          # picks up every imported round

A round lives in RUN_DIR/labels/round-NNN/: batch.jsonl (what labelers see), provenance.jsonl (which
stage wrote each candidate; never served), manifest.json, judgments.jsonl (appended and fsynced one
judgment at a time), pairs.parquet and summary.json (written by import).
"""

from __future__ import annotations

from pathlib import Path

from rlhf.runs import RoundFiles, RunDir


def round_files(run_dir: Path, round_no: int) -> RoundFiles:
    return RunDir(run_dir).labels.round(round_no)


def run_label(cfg, run_dir: Path, args) -> None:
    """`rlhf label ACTION`: one workflow function per action, each in its own module."""
    from rlhf.config import ConfigError, save_resolved

    if not 1 <= args.round <= 999:
        raise ConfigError(f"--round {args.round}: rounds are numbered 1 to 999")
    if args.action == "export":
        from rlhf.labeling.batch import export_round

        save_resolved(cfg, RunDir(run_dir), ["label"])
        export_round(cfg, run_dir, args.round)
    elif args.action == "serve":
        from rlhf.labeling.server import run_serve

        run_serve(cfg, run_dir, args.round, token=args.token, tokens_file=args.tokens_file)
    elif args.action == "import":
        from rlhf.labeling.importer import run_import

        _track_round(cfg, run_dir, run_import(cfg, run_dir, args.round))
    elif args.action == "simulate":
        from rlhf.labeling.simulate import run_simulate

        _track_round(cfg, run_dir, run_simulate(cfg, run_dir, args.round))


def _track_round(cfg, run_dir: Path, summary: dict) -> None:
    """An imported round's figures (pairs, agreement, stage wins) as one step of the trackers' labels run."""
    if cfg.track.report_to:
        from rlhf.tracking import log_round

        log_round(cfg, RunDir(run_dir), summary)
