"""SFT training throughput (tokens/s) of `rlhf sft` on a run's SFT examples.

    python bench/sft_throughput.py --run runs/demo [--steps 8] [--batch 4] [--config recipes/demo.yaml]

Needs a run with data/ (e.g. after `make demo` or `rlhf data prepare`). Trains a throwaway copy for
--steps steps and reads TRL's own counters: tokens seen (prompt + completion, padding excluded) over
train_runtime, both from the trainer log. Also prints seconds per step and peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from _common import ROOT, add_dtype_arg, device, resolve_dtype, run_child


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    add_dtype_arg(p)
    args = p.parse_args()
    args.dtype = resolve_dtype(args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        work.mkdir()
        os.symlink((Path(args.run) / "data").resolve(), work / "data")
        proc, peak = run_child(
            [
                sys.executable,
                "-m",
                "rlhf",
                "sft",
                "--run",
                str(work),
                "--config",
                args.config,
                f"sft.max_steps={args.steps}",
                f"sft.batch_size={args.batch}",
                "sft.num_samples=1",
                "sft.logging_steps=1",
                f"model.dtype={args.dtype}",
            ]
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        log = [json.loads(line) for line in (work / "sft" / "log.jsonl").read_text().splitlines()]
        gpu = json.loads((work / "sft" / "metrics.json").read_text()).get("gpu_peak_gb")
    secs = next(r for r in reversed(log) if "train_runtime" in r)["train_runtime"]
    tokens = next(r for r in reversed(log) if "num_tokens" in r)["num_tokens"]  # a step log, not the summary
    print(f"machine: {device()}; {args.dtype}; {args.steps} steps x batch {args.batch}")
    print(
        f"sft: {tokens:.0f} tokens in {secs:.1f} s = {tokens / secs:.0f} tokens/s; "
        f"{secs / args.steps:.2f} s/step; peak RSS {peak:.1f} GB" + (f", GPU peak {gpu:.1f} GB" if gpu else "")
    )


if __name__ == "__main__":
    main()
