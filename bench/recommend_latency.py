"""Latency of one listing from `rlhf recommend` (p50 / p95 over held-out users), with and without
--constrained decoding, the model loaded once as a service would.

    python bench/recommend_latency.py --run runs/demo [--stage ppo] [--users 20] [--max-new-tokens 112]

Needs a trained run (e.g. after `make demo`). Each call is the whole user-facing path: prompt build,
greedy generation (batch 1), parse and ground. The first call of each mode is a warm-up and not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import device  # noqa: E402


def main() -> None:
    from rlhf.config import load_config
    from rlhf.models import load_stage
    from rlhf.precision import resolve
    from rlhf.recommend import recommend
    from rlhf.runs import RunDir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=None, help="recipe the run was made with (for model settings)")
    p.add_argument("--stage", default="ppo", choices=["base", "sft", "ppo"])
    p.add_argument("--users", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=112)
    p.add_argument("--free-only", action="store_true", help="skip the constrained-decoding pass")
    p.add_argument(
        "overrides", nargs="*", metavar="section.field=value", help="config overrides, e.g. model.dtype=float32"
    )
    args = p.parse_args()
    run_dir = Path(args.run)
    cfg = load_config(args.config or (run_dir / "config.yaml"), args.overrides)
    run = RunDir(run_dir)
    k = run.meta()["k"]
    rows = run.rows(run.data.prompts("test"))[: args.users + 1]
    dtype = resolve(cfg.model)
    loaded = load_stage(run_dir, args.stage, cfg.model, dtype)
    if loaded is None:
        raise SystemExit(f"stage {args.stage} is not trained in {run_dir}")
    import torch

    print(
        f"machine: {device()}, torch threads {torch.get_num_threads()}; stage {args.stage}, "
        f"{len(rows) - 1} users, up to {args.max_new_tokens} new tokens, greedy, batch 1, {dtype}"
    )
    summary = {}
    for constrained in (False,) if args.free_only else (False, True):
        secs, grounded = [], []
        for i, r in enumerate(rows):
            t0 = time.perf_counter()
            out = recommend(
                run_dir,
                cfg.model,
                args.stage,
                r["history_ids"],
                k,
                constrained,
                args.max_new_tokens,
                prompt=r["prompt"],
                loaded=loaded,
            )
            if i:  # the first call warms up
                secs.append(time.perf_counter() - t0)
                grounded.append(np.mean([it["in_catalog"] for it in out["items"]]) if out["items"] else 0.0)
        mode = "constrained" if constrained else "free"
        summary[mode] = {
            "p50_s": float(np.percentile(secs, 50)),
            "p95_s": float(np.percentile(secs, 95)),
            "grounded": float(np.mean(grounded)),
        }
        print(
            f"{mode:>11}: p50 {np.percentile(secs, 50):.2f} s, "
            f"p95 {np.percentile(secs, 95):.2f} s; items grounded {np.mean(grounded):.2f}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
