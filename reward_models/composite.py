"""The learned reward model plus weighted rule terms, behind the interface TRL's PPO reads rewards through.

TRL 1.12's ``trl.experimental.utils.get_reward`` calls ``getattr(model, model.base_model_prefix)(input_ids=...,
attention_mask=..., position_ids=..., output_hidden_states=True, ...)`` and applies ``model.score`` to
``hidden_states[-1]``, reading the value at the last response token. Here the backbone returns, at every
position, ``rm_weight * learned score + sum(weight * rule term)`` as a one-channel "hidden state" and
``score`` is the identity, so PPO trains against the composite unchanged. The rule terms need the
user's history: prompts are registered by their token ids before training (``register``).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from reward_models.rules import TERMS, rule_terms, shown_pairs, weighted_sum
from rlhf.listing import parse_and_ground

ASSISTANT_HEADER = "<|im_start|>assistant\n"


@dataclass
class PromptContext:
    history_ids: list
    candidate_ids: list
    user_id: str | None = None
    shown: list | None = None  # (item id, rating) pairs the prompt showed

    @classmethod
    def from_row(cls, row: dict) -> PromptContext:
        """From a prompt row of the data stage (prompts/*.parquet)."""
        return cls(list(row["history_ids"]), list(row.get("candidate_ids") or []), row.get("user_id"), shown_pairs(row))


class _Backbone(nn.Module):
    def __init__(self, owner: CompositeReward):
        super().__init__()
        self._owner = [owner]  # a list, so the owner is not registered as a submodule (no cycle)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        return SimpleNamespace(
            hidden_states=(self._owner[0].per_position_reward(input_ids, attention_mask, position_ids),)
        )


class CompositeReward(nn.Module):
    base_model_prefix = "backbone"

    def __init__(self, reward_model, tokenizer, catalog, k: int, rules, rm_weight: float = 1.0, truth=None):
        """``truth(user_id, item_ids) -> float``, when given, is logged as ``true_utility`` and never
        enters the reward (it is the simulator's ground truth, for watching reward hacking)."""
        super().__init__()
        self.rm = reward_model
        self.backbone = _Backbone(self)
        self.score = nn.Identity()
        self.config = reward_model.config  # DeepSpeed reads hidden_size from here
        self.tokenizer, self.catalog, self.k, self.rules, self.rm_weight = tokenizer, catalog, k, rules, rm_weight
        self.truth = truth
        self.header = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.contexts: dict[tuple, PromptContext] = {}
        self.last_terms: dict[str, float] = {}
        self.last_samples: list[dict] = []  # the last batch's decoded responses with their reward parts
        for p in self.rm.parameters():
            p.requires_grad_(False)

    # -- prompt registry -----------------------------------------------------------------------
    def register(self, prompt_ids: list[int], ctx: PromptContext) -> None:
        self.contexts[tuple(prompt_ids)] = ctx

    def _split(self, ids: list[int]) -> tuple[tuple, list[int]]:
        """(prompt ids up to and including the last assistant header, response ids)."""
        h = len(self.header)
        for start in range(len(ids) - h, -1, -1):
            if ids[start : start + h] == self.header:
                return tuple(ids[: start + h]), ids[start + h :]
        return tuple(ids), []

    # -- scoring -------------------------------------------------------------------------------
    def learned(self, input_ids, attention_mask, position_ids):
        backbone = getattr(self.rm, self.rm.base_model_prefix)
        out = backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_dict=True,
            output_hidden_states=True,
            use_cache=False,
        )
        return self.rm.score(out.hidden_states[-1]).float()  # [B, T, 1]

    def terms_for(self, response_text: str, ctx: PromptContext | None) -> tuple[dict[str, float], float | None]:
        """(rule terms, true utility or None) of one response."""
        entries = parse_and_ground(response_text, self.catalog)
        terms = rule_terms(
            entries,
            self.k,
            ctx.history_ids if ctx else [],
            self.catalog,
            ctx.candidate_ids if ctx else None,
            ctx.shown if ctx else None,
        )
        truth = None
        if self.truth is not None and ctx is not None and ctx.user_id is not None:
            truth = self.truth(ctx.user_id, [e.item_id for e in entries], ctx.history_ids)
        return terms, truth

    @torch.no_grad()
    def per_position_reward(self, input_ids, attention_mask, position_ids):
        learned = self.learned(input_ids, attention_mask, position_ids)
        mask = attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        rule_totals, all_terms, truths, texts = [], [], [], []
        for row, m in zip(input_ids.tolist(), mask.tolist()):
            ids = [t for t, keep in zip(row, m) if keep]
            prompt, response = self._split(ids)
            eos = self.tokenizer.eos_token_id
            if eos in response:
                response = response[: response.index(eos)]
            text = self.tokenizer.decode(response, skip_special_tokens=True)
            texts.append(text)
            terms, truth = self.terms_for(text, self.contexts.get(prompt))
            all_terms.append(terms)
            if truth is not None:
                truths.append(truth)
            rule_totals.append(weighted_sum(terms, self.rules))
        self.last_terms = {t: sum(d[t] for d in all_terms) / len(all_terms) for t in TERMS}
        self.last_terms["learned"] = float(learned.mean()) if learned.numel() else 0.0
        if truths:
            self.last_terms["true_utility"] = sum(truths) / len(truths)
        rules = torch.tensor(rule_totals, dtype=torch.float32, device=learned.device).view(-1, 1, 1)
        total = self.rm_weight * learned + rules
        # where TRL reads the reward: the last real token (queries are left-padded, responses right-padded)
        last = (mask.shape[1] - 1 - mask.flip(1).float().argmax(1)).tolist()
        self.last_samples = [
            {"text": t, "reward": float(total[r, last[r], 0]), "learned": float(learned[r, last[r], 0]), **terms}
            for r, (t, terms) in enumerate(zip(texts, all_terms))
        ]
        return total

    @torch.no_grad()
    def score_texts(
        self, prompts: list[list[dict]], texts: list[str], contexts: list[PromptContext], batch_size: int = 16
    ) -> list[dict]:
        """Composite reward and its parts for finished responses (evaluation); same layout as PPO."""
        from reward_models.encoding import encode, pad_left

        device = next(self.rm.parameters()).device
        out = []
        for s in range(0, len(texts), batch_size):
            seqs = [
                encode(self.tokenizer, p, t) for p, t in zip(prompts[s : s + batch_size], texts[s : s + batch_size])
            ]
            ids, mask = pad_left(seqs, self.tokenizer.pad_token_id)
            ids, mask = ids.to(device), mask.to(device)
            pos = (mask.cumsum(1) - mask).clamp(min=0)
            learned = self.learned(ids, mask, pos)[:, -1, 0].tolist()
            for j, text in enumerate(texts[s : s + batch_size]):
                terms, _ = self.terms_for(text, contexts[s + j])
                total = self.rm_weight * learned[j] + weighted_sum(terms, self.rules)
                out.append({"reward": total, "learned": learned[j], **terms})
        return out
