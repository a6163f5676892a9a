"""The composite reward behind the interface TRL 1.12's PPO reads rewards through.

TRL's ``trl.experimental.utils.get_reward`` calls ``getattr(model, model.base_model_prefix)(input_ids=...,
attention_mask=..., position_ids=..., output_hidden_states=True, ...)``, applies ``model.score`` to
``hidden_states[-1]`` and reads the value at the last response token. Here the backbone decodes each response,
scores the texts with the composite and returns the total at every position as a one-channel "hidden state";
``score`` is the identity. The composite needs each prompt's messages and context: prompts are registered by their
token ids before training. What was scored is kept until the trainer takes it (``take_records``) for its logs.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from reward_models.composite import CompositeReward
from reward_models.encoding import ASSISTANT_HEADER, header_end
from reward_models.terms import PromptContext


class _Backbone(nn.Module):
    def __init__(self, owner: TRLRewardAdapter):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(hidden_states=(self._owner[0].per_position(input_ids, attention_mask),))


class TRLRewardAdapter(nn.Module):
    """``truth(contexts, completions) -> list[float]``, when given, is logged as ``true_utility`` and never enters
    the reward (the simulator's ground truth, for watching reward hacking)."""

    base_model_prefix = "backbone"

    def __init__(self, composite: CompositeReward, tokenizer, config, truth=None):
        super().__init__()
        self.composite, self.tokenizer, self.truth = composite, tokenizer, truth
        self.backbone = _Backbone(self)
        self.score = nn.Identity()
        self.config = config  # DeepSpeed reads hidden_size from here
        learned = composite.env.reward_model
        # a submodule, so TRL's .to(device) moves the reward model; DeepSpeed also wants one parameter
        self.scorer = learned.model if learned is not None else nn.Linear(1, 1, bias=False).requires_grad_(False)
        self.header = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.prompts: dict[tuple, tuple[list, PromptContext]] = {}
        self.records: list[dict] = []

    def register(self, prompt_ids: list[int], messages: list, ctx: PromptContext) -> None:
        self.prompts[tuple(prompt_ids)] = (messages, ctx)

    def take_records(self) -> list[dict]:
        """What was scored since the last call: per batch, term means and the decoded samples."""
        out, self.records = self.records, []
        return out

    def _split(self, ids: list[int]) -> tuple[tuple, list[int]]:
        """(prompt ids up to and including the last assistant header, response ids up to EOS)."""
        end = header_end(ids, self.header)
        prompt, response = (tuple(ids), []) if end is None else (tuple(ids[:end]), ids[end:])
        eos = self.tokenizer.eos_token_id
        return prompt, response[: response.index(eos)] if eos in response else response

    @torch.no_grad()
    def per_position(self, input_ids, attention_mask):
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        messages, contexts, texts = [], [], []
        for row, keep in zip(input_ids.tolist(), mask.tolist()):
            prompt, response = self._split([t for t, k in zip(row, keep) if k])
            msgs, ctx = self.prompts.get(prompt, ([], None))
            messages.append(msgs)
            contexts.append(ctx)
            texts.append(self.tokenizer.decode(response, skip_special_tokens=True))
        scored = self.composite.score(messages, texts, contexts)
        means = scored.means()
        if self.truth is not None and all(c is not None for c in contexts):
            truth = self.truth(contexts, texts)
            means["true_utility"] = sum(truth) / max(len(truth), 1)
        self.records.append({"means": means, "samples": [{"text": t, **r} for t, r in zip(texts, scored.rows())]})
        total = torch.tensor(scored.total, dtype=torch.float32, device=input_ids.device)
        return total.view(-1, 1, 1).expand(-1, input_ids.shape[1], 1)
