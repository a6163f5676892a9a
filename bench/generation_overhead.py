"""Greedy decoding's time per step against what its matmuls alone cost, and what a static KV cache and
torch.compile take off it (issue #17: "the per-token overhead measured against the matmul limit").

    python bench/generation_overhead.py [--batch 16] [--prompt-tokens 200] [--new-tokens 64] [--compile]

Rows, each on the same random prompts (greedy, min = max new tokens, so every row decodes the same count):
- `generate`, dynamic cache (what eval, recommend and the rollouts use);
- `generate`, static cache (`cache_implementation="static"`);
- with --compile: static cache and `torch.compile` on the forward (the compile time is printed apart);
- the matmul floor: every Linear of the model (LM head included) applied to a [batch, hidden] input once, in the
  model's dtype: the work one decode step cannot avoid; the rest of a step is attention over the cache, norms,
  sampling and per-op dispatch.
Medians over --reps after a warm-up. Figures, not assertions: docs/results.md quotes them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median_time  # noqa: E402


def main() -> None:
    import torch

    from rlhf.models import load_causal_lm, resolve_model
    from rlhf.precision import resolve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="add the static cache + torch.compile row (minutes)")
    args = p.parse_args()

    from rlhf.config import ModelConfig

    dtype = resolve(ModelConfig(dtype=args.dtype))
    model = load_causal_lm(resolve_model(args.model), dtype).eval()
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.prompt_tokens))
    mask = torch.ones_like(ids)
    n = args.new_tokens
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model} in {dtype}; batch {args.batch}")
    print(f"x {args.prompt_tokens}-token prompts, {n} new tokens, greedy\n")

    def gen(**kw):
        def run():
            with torch.no_grad():
                model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=0,
                    **kw,
                )

        return run

    rows = [("generate, dynamic cache", gen()), ("generate, static cache", gen(cache_implementation="static"))]
    results = []
    for name, fn in rows:
        secs = median_time(fn, args.reps)
        results.append((name, secs))
    if args.compile:
        eager = model.forward
        model.forward = torch.compile(eager, dynamic=False)
        t0 = time.perf_counter()
        gen(cache_implementation="static")()  # the first call compiles
        compile_s = time.perf_counter() - t0
        secs = median_time(gen(cache_implementation="static"), args.reps)
        results.append((f"static cache + torch.compile (compile {compile_s:.0f} s, once)", secs))
        model.forward = eager

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m.in_features: torch.randn(args.batch, m.in_features, dtype=m.weight.dtype) for m in linears}

    def floor():
        with torch.no_grad():
            for m in linears:
                torch.nn.functional.linear(x[m.in_features], m.weight)

    floor_s = median_time(floor, max(args.reps, 5))
    print(f"{'':<58} {'s':>7} {'ms/step':>8} {'tok/s':>7} {'x floor':>7}")
    for name, secs in results:
        step = secs / n
        print(f"{name:<58} {secs:7.2f} {1000 * step:8.1f} {args.batch / step:7.1f} {step / floor_s:7.1f}")
    print(f"{'matmul floor: every Linear once at batch ' + str(args.batch):<58} {'':>7} {1000 * floor_s:8.1f}")


if __name__ == "__main__":
    main()
