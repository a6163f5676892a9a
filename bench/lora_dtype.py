"""Forward + backward time of one LoRA training step and greedy generation speed, by how bf16 is applied.

    python bench/lora_dtype.py [--model smollm2-135m] [--batch 4] [--tokens 300] [--reps 3]

What it compares (the choices behind `model.dtype: auto` on a CPU with AMX / AVX-512 BF16):
training: fp32 throughout; fp32 weights under bf16 autocast; bf16 frozen base with fp32 LoRA (PEFT's
default) without and with autocast; bf16 base with bf16 LoRA; the last two again without LoRA dropout (p 0, PEFT's
identity; rows above use 0.05). Generation (batch 16, 64 new tokens):
the plain model and the model with an unmerged adapter, fp32 and bf16, plus a bf16 merged copy.
Medians over --reps after one warm-up. Numbers, not assertions: the README quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import median_time  # noqa: E402


def main() -> None:
    import torch
    from peft import get_peft_model

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer, lora_config, resolve_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--skip-generation", action="store_true")
    args = p.parse_args()
    path = resolve_model(args.model)
    tok = load_tokenizer(path)
    torch.manual_seed(0)
    ids = torch.randint(100, 40000, (args.batch, args.tokens))
    dropout = ModelConfig(lora_dropout=0.05)
    no_dropout = ModelConfig(lora_dropout=0.0)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, "
        f"batch {args.batch} x {args.tokens} tokens"
    )

    def peft(dtype, adapter_fp32=True, mcfg=dropout):
        model = get_peft_model(load_causal_lm(path, dtype), lora_config(mcfg), autocast_adapter_dtype=adapter_fp32)
        model.train()
        return model

    def step(model, autocast: bool):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

        def run():
            with ctx:
                out = model(input_ids=ids, labels=ids)
            out.loss.float().backward()
            model.zero_grad(set_to_none=True)

        return run

    rows = [
        ("fp32 weights, fp32 LoRA", lambda: peft("float32"), False),
        ("fp32 weights, fp32 LoRA, bf16 autocast", lambda: peft("float32"), True),
        ("bf16 base, fp32 LoRA (PEFT default)", lambda: peft("bfloat16"), False),
        ("bf16 base, fp32 LoRA, bf16 autocast", lambda: peft("bfloat16"), True),
        ("bf16 base, bf16 LoRA", lambda: peft("bfloat16", adapter_fp32=False), False),
        ("bf16 base, fp32 LoRA, autocast, no dropout", lambda: peft("bfloat16", mcfg=no_dropout), True),
        ("bf16 base, bf16 LoRA, no dropout", lambda: peft("bfloat16", adapter_fp32=False, mcfg=no_dropout), False),
    ]
    print("\ntraining step (forward + backward):")
    for name, build, autocast in rows:
        model = build()
        secs = median_time(step(model, autocast), args.reps)
        print(f"  {name:<42} {secs:6.2f} s")
        del model
    if args.skip_generation:
        return
    from rlhf.generation import generate

    msgs = [
        [{"role": "user", "content": "Recommend three films like Alien, Heat and The Matrix " + "please " * 20}]
    ] * 16

    def gen_speed(model):
        n_new = 64
        secs = median_time(
            lambda: generate(model, tok, msgs, max_new_tokens=n_new, batch_size=16, min_new_tokens=n_new),
            max(1, args.reps - 1),
        )
        return 16 * n_new / secs

    print("\ngreedy generation, batch 16 x 64 new tokens:")
    for dtype in ("float32", "bfloat16"):
        plain = load_causal_lm(path, dtype)
        print(f"  {dtype:<9} plain model              {gen_speed(plain):7.1f} tokens/s")
        model = get_peft_model(load_causal_lm(path, dtype), lora_config(dropout))
        print(f"  {dtype:<9} unmerged LoRA             {gen_speed(model):7.1f} tokens/s")
        merged = copy.deepcopy(model).merge_and_unload()
        print(f"  {dtype:<9} merged LoRA               {gen_speed(merged):7.1f} tokens/s")


if __name__ == "__main__":
    main()
