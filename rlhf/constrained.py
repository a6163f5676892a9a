"""Prefix-constrained decoding: at item positions only allowed titles can be written.

A token trie holds every allowed title as it appears after a list marker (" Title (Year)"): the whole catalog in
generate mode, or one prompt's candidates in rerank mode. While the current line is ``N.`` followed by a title in
progress, only tokens that continue some allowed title may come next; once a title is complete, the separator, a
newline or EOS may follow and the explanation is free text. Elsewhere nothing is constrained.

The same rule serves two paths, so a constrained policy is one distribution: ``TitleProcessor`` masks the
next-token scores during generation (one row at a time, as tokens arrive), and ``mask_logits`` masks every response
position of a full forward pass (PPO's rollout scoring, reference and optimisation forwards).
"""

from __future__ import annotations

import re

import torch
from transformers import LogitsProcessor

from rlhf.generation import newline_token_ids

_MARKER = re.compile(r"^\s*\d{1,2}\.$")
MASKED = -1e9  # finite: TRL's entropy multiplies probabilities by logits, and 0 * -inf is NaN


class TitleTrie:
    def __init__(self):
        self.children: dict[int, TitleTrie] = {}
        self.terminal = False

    def insert(self, ids: list[int]) -> None:
        node = self
        for t in ids:
            node = node.children.setdefault(t, TitleTrie())
        node.terminal = True

    @classmethod
    def from_items(cls, catalog, item_ids, tokenizer) -> TitleTrie:
        trie = cls()
        for i in item_ids:
            if i in catalog:
                trie.insert(tokenizer(" " + catalog[i].display, add_special_tokens=False)["input_ids"])
        return trie

    @classmethod
    def from_catalog(cls, catalog, tokenizer) -> TitleTrie:
        return cls.from_items(catalog, [it.item_id for it in catalog.items], tokenizer)


class ListingRule:
    """Which tokens may come next after ``generated`` response tokens, given the allowed titles' trie."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ends = (
            tokenizer(" —", add_special_tokens=False)["input_ids"],
            tokenizer("\n", add_special_tokens=False)["input_ids"],
        )
        self.after_title = sorted({ids[0] for ids in ends if ids} | {tokenizer.eos_token_id})
        self.newlines = newline_token_ids(tokenizer)

    def allowed(self, generated: list[int], trie: TitleTrie) -> list[int] | None:
        """None where nothing is constrained (outside an item line, or after its title)."""
        start = 0
        for j in range(len(generated) - 1, -1, -1):
            if generated[j] in self.newlines:
                start = j + 1
                break
        line = generated[start:]
        marker_end = None
        for i in range(min(len(line), 4)):
            if _MARKER.match(self.tokenizer.decode(line[: i + 1])):
                marker_end = i + 1
                break
        if marker_end is None:
            return None  # not in an item line (or still writing the marker)
        node = trie
        for t in line[marker_end:]:
            if t not in node.children:
                return None  # the title is finished: explanation text is free
            node = node.children[t]
        allowed = list(node.children) + (self.after_title if node.terminal else [])
        return allowed or None


class TitleProcessor(LogitsProcessor):
    """Generation-time masking. ``tries``: one trie for every row, or one per row (None: that row is free)."""

    def __init__(self, tries, tokenizer, prompt_length: int, rule: ListingRule | None = None):
        self.tries, self.prompt_length = tries, prompt_length
        self.rule = rule or ListingRule(tokenizer)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            trie = self.tries[row] if isinstance(self.tries, list) else self.tries
            allowed = self.rule.allowed(input_ids[row, self.prompt_length :].tolist(), trie) if trie else None
            if allowed is not None:
                mask = torch.full_like(scores[row], float("-inf"))
                mask[allowed] = 0.0
                scores[row] = scores[row] + mask
        return scores


def mask_logits(logits: torch.Tensor, input_ids: torch.Tensor, starts: list, tries: list, rule: ListingRule):
    """Full-sequence masking: for each row with a trie, every position that predicts a response token (the response
    starts at ``starts[row]``) keeps only the allowed tokens. Returns a new tensor (autograd-safe)."""
    mask = None
    ids = input_ids.tolist()
    for row, (start, trie) in enumerate(zip(starts, tries)):
        if trie is None or start is None:
            continue
        for u in range(start, len(ids[row])):
            allowed = rule.allowed(ids[row][start:u], trie)
            if allowed is None:
                continue
            if mask is None:
                mask = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
            mask[row, u - 1] = MASKED
            mask[row, u - 1, allowed] = 0.0
    return logits if mask is None else logits + mask


class PromptConstraints:
    """Per prompt, the titles its listing may use: the prompt's candidates where it offers some (rerank mode), the
    whole catalog otherwise. Prompts are known by their token ids (chat template up to the assistant header)."""

    def __init__(self, tokenizer, catalog):
        from reward_models.encoding import ASSISTANT_HEADER

        self.tokenizer, self.catalog, self.rule = tokenizer, catalog, ListingRule(tokenizer)
        self.header = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.catalog_trie = TitleTrie.from_catalog(catalog, tokenizer)
        self.by_prompt: dict[tuple, TitleTrie] = {}

    def register(self, prompt_ids: list[int], candidate_ids: list[str]) -> None:
        if candidate_ids:
            self.by_prompt[tuple(prompt_ids)] = TitleTrie.from_items(self.catalog, candidate_ids, self.tokenizer)

    def _split(self, ids: list[int], keep: list[int]) -> tuple[TitleTrie, int | None]:
        """(the row's trie, index of its first response token), from the last assistant header among kept tokens."""
        from reward_models.encoding import header_end

        real = [j for j, k in enumerate(keep) if k]
        end = header_end([ids[j] for j in real], self.header)
        if end is None:
            return self.catalog_trie, None
        prompt = tuple(ids[j] for j in real[:end])
        return self.by_prompt.get(prompt, self.catalog_trie), (real[end] if end < len(real) else len(ids))

    def processor(self, input_ids, attention_mask) -> TitleProcessor:
        rows = zip(input_ids.tolist(), attention_mask.tolist())
        tries = [self.by_prompt.get(tuple(i for i, k in zip(ids, keep) if k), self.catalog_trie) for ids, keep in rows]
        return TitleProcessor(tries, self.tokenizer, input_ids.shape[1], self.rule)

    def mask(self, logits, input_ids, attention_mask):
        keep = attention_mask.tolist() if attention_mask is not None else [[1] * input_ids.shape[1]] * len(input_ids)
        split = [self._split(ids, k) for ids, k in zip(input_ids.tolist(), keep)]
        return mask_logits(logits, input_ids, [s for _, s in split], [t for t, _ in split], self.rule)
