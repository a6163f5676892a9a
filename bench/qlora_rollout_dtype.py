"""Check the QLoRA PPO rollout dtype fix without a GPU: bitsandbytes 4-bit on CPU, SmolLM2-135M.

    pip install bitsandbytes && python bench/qlora_rollout_dtype.py [--model smollm2-135m]

Builds the policy the way TRL 1.12's PPOTrainer leaves it for a 4-bit model under bf16 (NF4 base, LoRA,
``peft_module_casting_to_bf16``: fp32 norms, bf16 lm_head) and generates outside autocast, as TRL's rollouts
do: once as is (expected to fail with a float/bfloat16 mismatch at the head) and once after
``rlhf.models.head_in_fp32`` (expected to generate). Prints one line per case; exits 1 if the fix fails.
"""

from __future__ import annotations

import argparse

import torch


def build(path: str):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from trl.experimental.utils import peft_module_casting_to_bf16

    from rlhf.models import quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization_config(True), dtype=torch.bfloat16, device_map={"": "cpu"}
    )
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_module_casting_to_bf16(model)
    return model


def try_generate(model, ids) -> str:
    try:
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
        return f"ok ({out.shape[1] - ids['input_ids'].shape[1]} new tokens)"
    except RuntimeError as exc:
        return f"failed: {exc}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args()
    from rlhf.models import head_in_fp32, load_tokenizer, resolve_model

    path = resolve_model(args.model)
    ids = load_tokenizer(path)("Recommend three films like Alien.", return_tensors="pt")
    model = build(path)
    print(f"as TRL leaves it (head {model.get_output_embeddings().weight.dtype}): {try_generate(model, ids)}")
    fixed = try_generate(head_in_fp32(model), ids)
    print(f"after head_in_fp32 (head {model.get_output_embeddings().weight.dtype}): {fixed}")
    return 0 if fixed.startswith("ok") else 1


if __name__ == "__main__":
    raise SystemExit(main())
