"""PPO's ratio before any update, by where the old log-probabilities come from, in float32 and bfloat16.

    python bench/ppo_ratio.py --run runs/demo [--batch 8] [--micro 4] [--response-length 96] [--temperature 0.3]

Needs a run with sft/merged and data/prompts. Builds the PPO policy as the stage does (the SFT model as a frozen base
in the compute dtype, a fresh LoRA adapter in float32), samples one rollout batch, and compares, for every sampled
token, the log-probability TRL's optimisation computes at its first step (a training forward of a micro-batch under
the trainer's autocast, with gradients on) with the "old" log-probability the ratio divides by:

- sampler: the sampler's own scores, TRL 1.12's default (KV-cached decoding, outside autocast);
- training: our recomputation (ppo.rollout_logprobs=training): the same forward on the whole rollout batch.

At that step the policy has not changed, so the ratio should be exactly 1; its spread, the share of tokens outside
PPO's clip range (0.2) and the approximate KL 0.5 E[log r^2] measure pure numerical disagreement.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import device  # noqa: E402


def _stats(new: torch.Tensor, old: torch.Tensor) -> str:
    ratio = (new - old).double().exp()
    outside = ((ratio - 1).abs() > 0.2).double().mean()
    kl = 0.5 * ((new - old).double() ** 2).mean()
    return f"ratio std {ratio.std():.2e}, outside clip {outside:.4f}, approx KL {kl:.2e}"


def measure(run: Path, dtype: str, a) -> None:
    from transformers import GenerationConfig
    from trl.experimental.ppo.ppo_trainer import forward

    from reward_models.encoding import pad_left, prompt_ids
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer, lora_config
    from rlhf.rollout import PPOPolicy
    from rlhf.runs import RunDir

    r = RunDir(run)
    tok = load_tokenizer(str(r.sft.merged))
    mc = ModelConfig(dtype=dtype)
    policy = PPOPolicy(load_causal_lm(str(r.sft.merged), dtype), lora_config(mc))
    policy.generation_config.pad_token_id = tok.pad_token_id
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if dtype == "bfloat16" else nullcontext
    policy.setup_rollouts(autocast, merged=True)
    rows = r.rows(r.data.prompts("train"))[: a.batch]
    ids, mask = pad_left([prompt_ids(tok, x["prompt"]) for x in rows], tok.pad_token_id)
    config = GenerationConfig(
        max_new_tokens=a.response_length,
        do_sample=True,
        temperature=a.temperature + 1e-7,
        top_k=0,
        top_p=1.0,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    query = torch.masked_fill(ids, ~mask.bool(), 0)
    sampler = policy.merged_copy
    sampler.refresh()
    sampler.model.generation_config = policy.generation_config
    out = sampler.model.generate(
        input_ids=query, attention_mask=mask, generation_config=config, return_dict_in_generate=True, output_scores=True
    )
    width = ids.shape[1]
    responses = out.sequences[:, width:]
    sampler_lp = torch.log_softmax(torch.stack(out.scores, 1).float(), -1)
    training_logits = policy.rollout_logits(query, mask, out.sequences, config)
    query_response = torch.cat([ids, responses], 1)
    news = []
    policy.train()
    for s in range(0, len(rows), a.micro):  # the optimisation's forward: micro-batches, autocast, gradients on
        with autocast():
            logits = forward(policy, query_response[s : s + a.micro], tok.pad_token_id).logits[:, width - 1 : -1]
        news.append(torch.log_softmax(logits.float() / config.temperature, -1).detach())
    new_lp = torch.cat(news)
    take = responses.unsqueeze(-1)
    valid = responses != tok.pad_token_id
    new = new_lp.gather(-1, take).squeeze(-1)[valid]
    old_sampler = sampler_lp.gather(-1, take).squeeze(-1)[valid]
    old_training = torch.log_softmax(training_logits, -1).gather(-1, take).squeeze(-1)[valid]
    print(f"{dtype:9s} {int(valid.sum())} tokens  old = sampler : {_stats(new, old_sampler)}")
    print(f"{'':9s} {'':{len(str(int(valid.sum())))}s}         old = training: {_stats(new, old_training)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--micro", type=int, default=4)
    p.add_argument("--response-length", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--dtypes", default="float32,bfloat16")
    a = p.parse_args()
    print(
        f"machine: {device()}; batch {a.batch} (micro-batches of {a.micro}), {a.response_length} new tokens, "
        f"temperature {a.temperature}"
    )
    for dtype in a.dtypes.split(","):
        measure(Path(a.run), dtype, a)


if __name__ == "__main__":
    main()
