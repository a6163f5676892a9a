"""How PPO's rollouts are sampled and which log-probabilities enter its ratio.

TRL 1.12 samples rollouts with ``policy.generate(..., output_scores=True)`` and takes the "old" log-probabilities
from the sampler's own scores; the optimisation later recomputes them with a full forward pass of the training
model. The two paths differ numerically (KV-cached incremental decoding against one pass, no autocast against
autocast), by little in float32 and by much more in bf16. ``PPOPolicy.generate`` changes two things:

1. Old log-probabilities come from the same forward the optimisation runs (TRL's ``forward`` on the same token
   layout, under the same autocast), so the first PPO step's ratio is 1 up to float noise in any dtype.
2. With that, sampling is free to take the fast path: a copy of the policy with its LoRA adapters merged into the
   weights (``MergedCopy``), refreshed from the live adapters before each rollout. On CPU an unmerged adapter
   halves generation speed. The copy is refreshed from the frozen base each time, so rounding never accumulates.
   Sampling from the merged copy instead of the unmerged policy differs only by float rounding.

With ``constraints`` (rlhf/constrained.py) the policy is the constrained one everywhere: sampling masks item
positions to the prompt's allowed titles, and every full forward of the policy (the recomputed old log-probs, the
reference pass with the adapter off, the optimisation) masks the same positions, so PPO's ratio and KL are those of
one distribution.

GRPO and RLOO (rlhf/rl.py) already take old log-probabilities from a training forward; their ``SampledPolicy``
only samples from the merged copy.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from types import SimpleNamespace

import torch
from peft import PeftModelForCausalLM
from peft.tuners.lora import LoraLayer


class MergedCopy:
    """A plain copy of a LoRA policy with the adapter folded into its weights; ``refresh`` re-merges."""

    def __init__(self, policy):
        self.model = copy.deepcopy(policy).merge_and_unload()
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        live = dict(policy.get_base_model().named_modules())
        mine = dict(self.model.named_modules())
        # each LoRA layer of the live policy and the plain Linear it became in the copy
        self.pairs = [(module, mine[name]) for name, module in live.items() if isinstance(module, LoraLayer)]

    @torch.no_grad()
    def refresh(self) -> None:
        for lora, linear in self.pairs:
            base = lora.get_base_layer().weight
            delta = sum(lora.get_delta_weight(a) for a in lora.active_adapters if a in lora.lora_A)
            linear.weight.copy_((base.float() + delta.float()).to(linear.weight.dtype))


class SamplingPolicy(PeftModelForCausalLM):
    """A LoRA policy that samples from a merged copy of itself (``merged_copy``, refreshed from the live adapter at
    each call) and, with ``constraints``, is the constrained policy everywhere: sampling masks item positions to
    each prompt's allowed titles, and every full forward (old log-probs, reference, optimisation) masks the same."""

    merged_copy: MergedCopy | None = None
    constraints = None  # rlhf.constrained.PromptConstraints: the titles each prompt's listing may use
    _generating = False

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        if self.constraints is not None and not self._generating and kwargs.get("input_ids") is not None:
            out.logits = self.constraints.mask(out.logits, kwargs["input_ids"], kwargs.get("attention_mask"))
        return out

    def _sample(self, *args, **kwargs):
        if self.constraints is not None:
            from transformers import LogitsProcessorList

            config = kwargs.get("generation_config") or self.generation_config
            temperature = config.temperature if config.do_sample and config.temperature else 1.0
            proc = self.constraints.processor(kwargs["input_ids"], kwargs["attention_mask"], temperature)
            kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), proc])
        if self.merged_copy is not None:
            self.merged_copy.refresh()
            self.merged_copy.model.generation_config = self.generation_config
            return self.merged_copy.model.generate(*args, **kwargs)
        self._generating = True
        try:
            return super().generate(*args, **kwargs)
        finally:
            self._generating = False


class PPOPolicy(SamplingPolicy):
    """The PPO policy: LoRA on the SFT model. Its ``generate`` is TRL's rollout sampler when asked for scores
    (``output_scores=True``, which only TRL's rollout does); every other call is PEFT's own."""

    rollout_autocast = None  # set by setup_rollouts: the trainer's autocast context factory
    logprobs_from = "training"  # or "sampler": TRL's default, the sampler's own scores
    cliprange = 0.2
    generation_seconds = 0.0  # time spent sampling rollouts, for the trainer's per-phase timing

    def setup_rollouts(self, autocast, merged: bool, logprobs_from="training", cliprange=0.2, constraints=None):
        self.rollout_autocast = autocast or nullcontext
        self.merged_copy = MergedCopy(self) if merged else None
        self.logprobs_from, self.cliprange, self.constraints = logprobs_from, cliprange, constraints
        self._gaps: list[torch.Tensor] = []

    def generate(self, *args, **kwargs):
        if not kwargs.get("output_scores") or self.rollout_autocast is None:
            return super().generate(*args, **kwargs)
        t0 = time.time()
        out = self._sample(*args, **kwargs)
        self.generation_seconds += time.time() - t0
        input_ids, mask, config = kwargs["input_ids"], kwargs["attention_mask"], kwargs["generation_config"]
        width = input_ids.shape[1]
        training = self.rollout_logits(input_ids, mask, out.sequences, config)
        self._record_gap(out.sequences[:, width:], torch.stack(out.scores, 1), training)
        scores = tuple(training.unbind(1)) if self.logprobs_from == "training" else out.scores
        return SimpleNamespace(sequences=out.sequences, scores=scores)

    @torch.no_grad()
    def rollout_logits(self, input_ids, attention_mask, sequences, generation_config) -> torch.Tensor:
        """[batch, generated steps, vocab]: the logits TRL's optimisation will compute for each generated token
        (same forward, same autocast, same temperature scaling)."""
        from trl.experimental.ppo.ppo_trainer import forward

        pad = self.generation_config.pad_token_id
        width = input_ids.shape[1]
        query = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, pad))
        query_response = torch.cat([query, sequences[:, width:]], 1)
        with self.rollout_autocast():
            logits = forward(self, query_response, pad).logits[:, width - 1 : -1].float()
        return logits / generation_config.temperature

    @torch.no_grad()
    def _record_gap(self, responses, sampler_logits, training_logits) -> None:
        """log p_training - log p_sampler of each sampled token: the ratio PPO's first step would see if the old
        log-probabilities came from the sampler (TRL's default)."""
        tokens = responses.unsqueeze(-1)
        lp_train = torch.log_softmax(training_logits, -1).gather(-1, tokens).squeeze(-1)
        lp_sample = torch.log_softmax(sampler_logits.float(), -1).gather(-1, tokens).squeeze(-1)
        valid = responses != self.generation_config.pad_token_id
        self._gaps.append((lp_train - lp_sample)[valid].cpu())

    def take_rollout_stats(self) -> dict:
        """Since the last call: spread of the sampler-vs-training ratio over sampled tokens, and the share of tokens
        it puts outside PPO's clip range before any update."""
        gaps, self._gaps = getattr(self, "_gaps", []), []
        if not gaps:
            return {}
        ratio = torch.cat(gaps).double().exp()
        return {
            "sampler_ratio_std": float(ratio.std()) if ratio.numel() > 1 else 0.0,
            "sampler_ratio_outside_clip": float(((ratio - 1).abs() > self.cliprange).double().mean()),
            "sampler_approxkl": float(0.5 * (ratio.log() ** 2).mean()),
        }


class SampledPolicy(SamplingPolicy):
    """The GRPO / RLOO policy: TRL's GRPO and RLOO take their old log-probabilities from a training forward, so
    only sampling moves to the merged copy (once ``use_merged_copy`` has run) and the constraints' processor."""

    def use_merged_copy(self) -> None:
        self.merged_copy = MergedCopy(self)

    def generate(self, *args, **kwargs):
        if self.merged_copy is None and self.constraints is None:
            return super().generate(*args, **kwargs)
        return self._sample(*args, **kwargs)


def build_policy(policy_cls, sft_path, model_cfg, pad_id: int, init_adapter=None):
    """The RL policy: RUN_DIR/sft/merged (frozen, in the compute dtype) + a LoRA adapter of class ``policy_cls``, fresh
    or holding the weights of a saved adapter (``init_adapter``: RL continues from that policy, e.g. the previous
    round's). The reference stays the SFT model: the same network with the adapter disabled. Without LoRA (PPO only)
    the plain model. Returns (policy, start): start records the reference and the adapter it began from, with the
    digest of the weights as loaded."""
    from rlhf.models import load_causal_lm, lora_config
    from rlhf.precision import base_dtype

    model = load_causal_lm(str(sft_path), base_dtype(model_cfg), model_cfg.load_in_4bit)
    model.generation_config.pad_token_id = pad_id
    start = {"reference": str(sft_path), "init_adapter": None}
    if not model_cfg.use_lora:
        return model, start
    policy = policy_cls(model, lora_config(model_cfg))
    if init_adapter:
        start["init_adapter"] = {"path": str(init_adapter), "digest": start_from_adapter(policy, init_adapter)}
    return policy, start


def start_from_adapter(policy, path) -> str:
    """Copy a saved adapter's LoRA weights into ``policy``'s adapter; every LoRA weight must be matched both ways.
    Returns the digest of the policy's LoRA weights afterwards (equal to the file's: ``lora_digest``)."""
    from pathlib import Path

    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    from rlhf.models import ModelError

    saved = load_file(str(Path(path) / "adapter_model.safetensors"))
    set_peft_model_state_dict(policy, saved)
    own = get_peft_model_state_dict(policy)
    if set(own) != set(saved):
        odd = sorted(set(own) ^ set(saved))
        raise ModelError(f"{path}: its LoRA weights do not match the policy's adapter ({len(odd)} differ: {odd[0]}, …)")
    return lora_digest(own)


def lora_digest(state: dict) -> str:
    """A digest of LoRA weights by name and float32 value: the same for a policy's adapter and the file it came from."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
