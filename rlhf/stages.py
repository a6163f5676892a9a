"""Small stage wrappers that need no trainer: the data stage."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.config import Config, save_resolved


def run_data(cfg: Config, run_dir: Path) -> dict:
    from rlhf.prepare import prepare

    save_resolved(cfg, run_dir, ["data"])
    summary = prepare(cfg.data, cfg.model.name, run_dir)
    skipped = summary["skipped"]["total"]
    print(
        f"data: {summary['users']} users, {summary['items']} items, {summary['interactions']} interactions; "
        f"{skipped} rows skipped" + (f" ({json.dumps(summary['skipped']['counts'])})" if skipped else "")
    )
    print(f"data: wrote {run_dir / 'data'} " + ", ".join(f"{k}={v}" for k, v in summary["rows"].items()))
    return summary
