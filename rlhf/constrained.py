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
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from rlhf.generation import newline_token_ids

_MARKER = re.compile(r"^\s*\d{1,2}\.$")
MASKED = -1e9  # finite: TRL's entropy multiplies probabilities by logits, and 0 * -inf is NaN


class TitleTrie:
    """Token paths of titles; each node knows the items whose title passes through it."""

    def __init__(self):
        self.children: dict[int, TitleTrie] = {}
        self.item: str | None = None  # the item whose title ends here
        self.items: set[str] = set()

    def insert(self, ids: list[int], item_id: str) -> None:
        node = self
        node.items.add(item_id)
        for t in ids:
            node = node.children.setdefault(t, TitleTrie())
            node.items.add(item_id)
        node.item = item_id

    def walk(self, tokens: list[int]) -> tuple[TitleTrie, int]:
        """The node after following ``tokens`` as far as titles go, and how many tokens that took."""
        node, n = self, 0
        for t in tokens:
            if t not in node.children:
                break
            node, n = node.children[t], n + 1
        return node, n

    @classmethod
    def from_items(cls, catalog, item_ids, tokenizer) -> TitleTrie:
        trie = cls()
        for i in item_ids:
            if i in catalog:
                trie.insert(tokenizer(" " + catalog[i].display, add_special_tokens=False)["input_ids"], i)
        return trie

    @classmethod
    def from_catalog(cls, catalog, tokenizer) -> TitleTrie:
        return cls.from_items(catalog, [it.item_id for it in catalog.items], tokenizer)


@dataclass(frozen=True)
class Allowed:
    """The titles one prompt's listing may use: a trie, minus ``banned`` items (what the user already has)."""

    trie: TitleTrie
    banned: frozenset = frozenset()
    k: int | None = None  # after K item lines and a line break only EOS may come (None: no limit)


class ListingRule:
    """Which tokens may come next after ``generated`` response tokens. At an item position: only continuations of
    an allowed title that is not banned and not already listed in an earlier line; so a constrained listing has no
    made-up titles, no repeats and nothing the user already has."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        ends = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" —", "\n")]
        self.after_title = sorted({ids[0] for ids in ends if ids} | {tokenizer.eos_token_id})
        self.after_title_set = frozenset(self.after_title)
        self.newlines = newline_token_ids(tokenizer)

    def _title_tokens(self, line: list[int]) -> list[int] | None:
        """The tokens after an item line's marker ("N."), or None for a line that is not (yet) an item line."""
        for i in range(min(len(line), 4)):
            if _MARKER.match(self.tokenizer.decode(line[: i + 1])):
                return line[i + 1 :]
        return None

    def _lines(self, generated: list[int]) -> list[list[int]]:
        lines, start = [], 0
        for j, t in enumerate(generated):
            if t in self.newlines:
                lines.append(generated[start:j])
                start = j + 1
        return [*lines, generated[start:]]

    def allowed(self, generated: list[int], allowed: Allowed) -> list[int] | None:
        """None where nothing is constrained (outside an item line, or after its title)."""
        *earlier, line = self._lines(generated)
        if allowed.k and not line and sum(self._title_tokens(p) is not None for p in earlier) >= allowed.k:
            return [self.tokenizer.eos_token_id]  # the listing is complete: no second listing after it
        title = self._title_tokens(line)
        if title is None:
            return None  # not in an item line (or still writing the marker)
        node, n = allowed.trie.walk(title)
        if n < len(title):
            return None  # the title is finished: explanation text is free
        used = set(allowed.banned)
        for previous in earlier:  # titles already listed may not come again
            tokens = self._title_tokens(previous)
            if tokens is not None:
                end, _ = allowed.trie.walk(tokens)
                used.add(end.item)
        out = [t for t, child in node.children.items() if any(i not in used for i in child.items)]
        if node.item is not None and node.item not in used:
            out += self.after_title
        return out or None


class TitleProcessor(LogitsProcessor):
    """Generation-time masking. ``allowed``: one ``Allowed`` (or trie) for every row, or one per row (None: free).

    ``explore`` > 0 (RL rollouts only): at each title choice (an item position inside no complete title, where more
    than one allowed token may come) the next token is drawn from ``(1 - explore) * p + explore * uniform(allowed)``,
    p being the policy's distribution at the sampling ``temperature``; so every offered title keeps at least
    ``explore / n`` of the choice, however sure the policy is. Explanation text and the tokens inside a title are
    sampled as the policy says. The trainers' old log-probabilities stay the policy's own (rlhf/rollout.py): an
    explored listing is scored and learned from as if the policy had written it; the sampler-vs-policy gap is what
    PPO's ``rollout/sampler_*`` metrics report."""

    def __init__(
        self,
        allowed,
        tokenizer,
        prompt_length: int,
        rule: ListingRule | None = None,
        explore: float = 0.0,
        temperature: float = 1.0,
    ):
        if not 0.0 <= explore <= 1.0:
            raise ValueError(f"explore must be in [0, 1], got {explore}")
        self.allowed, self.prompt_length = allowed, prompt_length
        self.rule = rule or ListingRule(tokenizer)
        self.explore, self.temperature = explore, temperature
        self.explored = 0  # title choices this processor mixed (tests read it; no trainer metric does yet)

    def _for(self, row: int):
        a = self.allowed[row] if isinstance(self.allowed, list) else self.allowed
        return Allowed(a) if isinstance(a, TitleTrie) else a

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for row in range(input_ids.shape[0]):
            allowed = self._for(row)
            tokens = self.rule.allowed(input_ids[row, self.prompt_length :].tolist(), allowed) if allowed else None
            if tokens is None:
                continue
            mask = torch.full_like(scores[row], float("-inf"))
            mask[tokens] = 0.0
            scores[row] = scores[row] + mask
            if self.explore > 0 and len(tokens) > 1 and self.rule.after_title_set.isdisjoint(tokens):
                scores[row] = self._mixed(scores[row], tokens)
                self.explored += 1
        return scores

    def _mixed(self, row_scores: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Scores whose softmax at ``temperature`` (applied after this processor) is the exploration mixture."""
        t = max(self.temperature, 1e-6)
        p = torch.softmax(row_scores.float() / t, -1)
        mixed = (1.0 - self.explore) * p[tokens] + self.explore / len(tokens)
        out = torch.full_like(row_scores, float("-inf"))
        out[tokens] = (mixed.log() * t).to(row_scores.dtype)
        return out


def mask_logits(logits: torch.Tensor, input_ids: torch.Tensor, starts: list, allowed: list, rule: ListingRule):
    """Full-sequence masking: for each row with an ``Allowed``, every position that predicts a response token (the
    response starts at ``starts[row]``) keeps only the allowed tokens. ``logits`` may hold only the last positions
    (a trainer's ``logits_to_keep``). Returns a new tensor (autograd-safe)."""
    mask = None
    ids = input_ids.tolist()
    offset = input_ids.shape[1] - logits.shape[1]
    for row, (start, titles) in enumerate(zip(starts, allowed)):
        if titles is None or start is None:
            continue
        for u in range(start, len(ids[row])):
            tokens = rule.allowed(ids[row][start:u], titles)
            if tokens is None:
                continue
            if u - 1 < offset:
                continue
            if mask is None:
                mask = torch.zeros(logits.shape, dtype=logits.dtype, device=logits.device)
            mask[row, u - 1 - offset] = MASKED
            mask[row, u - 1 - offset, tokens] = 0.0
    return logits if mask is None else logits + mask


class PromptConstraints:
    """Per prompt, the titles its listing may use: the prompt's candidates where it offers some (rerank mode), the
    whole catalog otherwise, never the user's history. Prompts are known by their token ids (chat template up to the
    assistant header); an unregistered prompt may use the whole catalog."""

    def __init__(self, tokenizer, catalog, explore: float = 0.0):
        from reward_models.encoding import ASSISTANT_HEADER

        self.tokenizer, self.catalog, self.rule = tokenizer, catalog, ListingRule(tokenizer)
        self.header = tokenizer(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"]
        self.everything = Allowed(TitleTrie.from_catalog(catalog, tokenizer))
        self.by_prompt: dict[tuple, Allowed] = {}
        self._tries: dict[tuple, TitleTrie] = {}
        self.explore = explore  # RL rollouts only (ppo.title_explore): see TitleProcessor

    def register(
        self, prompt_ids: list[int], candidate_ids: list[str], history_ids: list[str] = (), k: int | None = None
    ) -> None:
        trie = self.everything.trie
        if candidate_ids:
            key = tuple(sorted(candidate_ids))
            if key not in self._tries:
                self._tries[key] = TitleTrie.from_items(self.catalog, candidate_ids, self.tokenizer)
            trie = self._tries[key]
        self.by_prompt[tuple(prompt_ids)] = Allowed(trie, frozenset(history_ids), k)

    def _split(self, ids: list[int], keep: list[int]) -> tuple[Allowed, int | None]:
        """(the row's allowed titles, index of its first response token), from the last assistant header."""
        from reward_models.encoding import header_end

        real = [j for j, k in enumerate(keep) if k]
        end = header_end([ids[j] for j in real], self.header)
        if end is None:
            return self.everything, None
        prompt = tuple(ids[j] for j in real[:end])
        return self.by_prompt.get(prompt, self.everything), (real[end] if end < len(real) else len(ids))

    def processor(self, input_ids, attention_mask, temperature: float = 1.0) -> TitleProcessor:
        """The masking processor for a generation batch; it explores title choices by ``self.explore``, drawn at
        the sampling ``temperature``."""
        rows = zip(input_ids.tolist(), attention_mask.tolist())
        allowed = [self.by_prompt.get(tuple(i for i, k in zip(ids, keep) if k), self.everything) for ids, keep in rows]
        return TitleProcessor(
            allowed, self.tokenizer, input_ids.shape[1], self.rule, explore=self.explore, temperature=temperature
        )

    def mask(self, logits, input_ids, attention_mask):
        keep = attention_mask.tolist() if attention_mask is not None else [[1] * input_ids.shape[1]] * len(input_ids)
        split = [self._split(ids, k) for ids, k in zip(input_ids.tolist(), keep)]
        return mask_logits(logits, input_ids, [s for _, s in split], [a for a, _ in split], self.rule)
