"""Seconds per PPO update, split into generation / scoring / optimisation, for `rlhf ppo` and for a plain
TRL 1.12 PPOTrainer with the same policy, batch, response length and epochs.

    python bench/ppo_step.py --run runs/demo [--updates 4] [--batch 8] [--response-length 96] [--skip-plain]
                             [--dtype auto] [--plain-dtype float32]

Needs a run with data/, sft/merged and reward/model (e.g. after `make demo`). "Plain" is what a user gets
from TRL directly: LoRA policy on the SFT model, the full reward model as reward, and a full copy of it,
trained in full, as value model. Ours: the composite reward (learned RM + rule terms) and a LoRA value
model (`ppo.value_layers` to truncate it). Prints medians over the updates after the first (warm-up),
peak resident memory of each process, and as its last line `ratio ours/plain = X.XX`.

Each side runs as its user would run it: ours at `model.dtype` --dtype (default auto: what `rlhf ppo` resolves
on this machine, bf16 on a CPU with AMX / AVX-512 BF16), plain TRL at --plain-dtype (default float32: TRL's own
default, which is what a user gets without asking).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, device, run_child, scratch_run

from rlhf.precision import DTYPES, resolved


def ours(run: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = scratch_run(run, Path(tmp) / "run")
        cmd = [
            sys.executable,
            "-m",
            "rlhf",
            "ppo",
            "--run",
            str(work),
            "--config",
            args.config,
            f"ppo.total_updates={args.updates}",
            f"ppo.batch_size={args.batch}",
            f"ppo.response_length={args.response_length}",
            f"ppo.ppo_epochs={args.epochs}",
            f"ppo.mini_batches={args.mini_batches}",
            "ppo.checkpoint_every=1000",
            f"ppo.value_layers={args.value_layers}",
            f"ppo.temperature={args.temperature}",
            f"model.dtype={args.dtype}",
        ]
        t0 = time.time()
        proc, peak = run_child(cmd)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows = [json.loads(line) for line in (work / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steady = rows[1:] or rows
    return {
        "update_s": statistics.median(r["time/update_s"] for r in steady),
        "generation_s": statistics.median(r["time/generation_s"] for r in steady),
        "scoring_s": statistics.median(r["time/scoring_s"] for r in steady),
        "optimisation_s": statistics.median(r["time/optimisation_s"] for r in steady),
        "peak_gb": peak,
        "wall_s": time.time() - t0,
        "gpu_peak_gb": rows[-1].get("memory/gpu_peak_gb"),
    }


def plain(run: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        proc, peak = run_child(
            [
                sys.executable,
                str(ROOT / "bench" / "plain_trl_ppo.py"),
                str(run),
                str(args.updates),
                str(args.batch),
                str(args.response_length),
                str(args.epochs),
                str(args.mini_batches),
                tmp,
                str(args.temperature),
                args.plain_dtype,
            ]
        )
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["peak_gb"] = peak
    result["wall_s"] = time.time() - t0
    return result


def _gpu(result: dict) -> str:
    return f", GPU peak {result['gpu_peak_gb']:.1f} GB" if result.get("gpu_peak_gb") is not None else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--config", default=str(ROOT / "recipes" / "demo.yaml"))
    p.add_argument("--updates", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--mini-batches", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--response-length", type=int, default=96)
    p.add_argument("--value-layers", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.5, help="rollout temperature, the same for both")
    p.add_argument(
        "--dtype", default="auto", choices=DTYPES, help="ours: model.dtype (auto: as `rlhf ppo` resolves it here)"
    )
    p.add_argument("--plain-dtype", default="float32", choices=["float32", "bfloat16"], help="plain TRL's dtype")
    p.add_argument("--skip-plain", action="store_true")
    args = p.parse_args()
    run = Path(args.run)
    ours_dtype, why = resolved(args.dtype)
    print(
        f"machine: {device()}; ours {ours_dtype} ({why}), plain {args.plain_dtype}; "
        f"batch {args.batch} x {args.response_length} new tokens, "
        f"{args.epochs} epochs x {args.mini_batches} mini-batches, {args.updates} updates (first is warm-up)"
    )
    a = ours(run, args)
    print(
        f"ours : {a['update_s']:.1f} s/update (generation {a['generation_s']:.1f}, scoring {a['scoring_s']:.1f}, "
        f"optimisation {a['optimisation_s']:.1f}); peak RSS {a['peak_gb']:.1f} GB{_gpu(a)}"
    )
    if args.skip_plain:
        return
    b = plain(run, args)
    print(
        f"plain: {b['update_s']:.1f} s/update (generation {b['generation_s']:.1f}, scoring {b['scoring_s']:.1f}, "
        f"rest {b['optimisation_s']:.1f}); peak RSS {b['peak_gb']:.1f} GB{_gpu(b)}"
    )
    print(f"ratio ours/plain = {a['update_s'] / b['update_s']:.2f}")


if __name__ == "__main__":
    main()
