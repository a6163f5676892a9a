"""Prefix-constrained decoding: at item positions only catalog titles can be written.

A token trie holds every catalog title as it appears after a list marker (" Title (Year)"). While the
current line is ``N.`` followed by a title in progress, a logits processor masks every token that does
not continue some title; once a title is complete, the separator or a newline may follow and the
explanation is free text. Elsewhere the processor does nothing, so it costs one decode per step.
"""

from __future__ import annotations

import re

import torch
from transformers import LogitsProcessor

from rlhf.generation import newline_token_ids

_MARKER = re.compile(r"^\s*\d{1,2}\.$")


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
    def from_catalog(cls, catalog, tokenizer) -> TitleTrie:
        trie = cls()
        for it in catalog.items:
            trie.insert(tokenizer(" " + it.display, add_special_tokens=False)["input_ids"])
        return trie


class CatalogTitleProcessor(LogitsProcessor):
    def __init__(self, trie: TitleTrie, tokenizer, prompt_length: int):
        self.trie, self.tokenizer, self.prompt_length = trie, tokenizer, prompt_length
        self.after_title = sorted(
            {
                ids[0]
                for ids in (
                    tokenizer(" —", add_special_tokens=False)["input_ids"],
                    tokenizer("\n", add_special_tokens=False)["input_ids"],
                    [tokenizer.eos_token_id],
                )
                if ids
            }
        )
        self._newline_ids = newline_token_ids(tokenizer)

    def _allowed(self, generated: list[int]) -> list[int] | None:
        start = 0
        for j in range(len(generated) - 1, -1, -1):
            if generated[j] in self._newline_ids:
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
        node = self.trie
        for t in line[marker_end:]:
            if t in node.children:
                node = node.children[t]
            else:
                return None  # the title is finished: explanation text is free
        allowed = list(node.children)
        if node.terminal:
            allowed += self.after_title
        return allowed or None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            allowed = self._allowed(input_ids[row, self.prompt_length :].tolist())
            if allowed is None:
                continue
            mask = torch.full_like(scores[row], float("-inf"))
            mask[allowed] = 0.0
            scores[row] = scores[row] + mask
        return scores
