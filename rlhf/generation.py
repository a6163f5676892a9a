"""Batched generation from chat prompts: the one path SFT samples, eval, recommend and labeling use.

A generation does no more work than it must: prompts are batched longest first (little padding), and with
``k`` a row stops once it has written K item lines (``ListingStop``) instead of running on to
``max_new_tokens`` or EOS.
"""

from __future__ import annotations

import re

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

_ITEM_LINE = re.compile(r"^\s*(?:\d{1,2}\s*[.)]|[-*•])\s+\S")


def is_item_line(line: str) -> bool:
    """A numbered or bulleted line with text after its marker: what ListingStop counts as one of the K items."""
    return bool(_ITEM_LINE.match(line))


def first_k_item_lines(text: str, k: int) -> str:
    """``text`` up to the end of its K-th item line: where generation with ``k`` stops (ListingStop), for text from
    a generator that stops only at EOS (llama.cpp)."""
    lines, items = [], 0
    for line in text.split("\n"):
        lines.append(line)
        items += is_item_line(line)
        if items >= k:
            break
    return "\n".join(lines)


_NEWLINE_IDS: dict[tuple, frozenset] = {}


def newline_token_ids(tokenizer) -> frozenset:
    """Ids of every token whose text contains a newline (computed once per vocabulary, ~0.5 s)."""
    key = (tokenizer.name_or_path, len(tokenizer))
    if key not in _NEWLINE_IDS:
        _NEWLINE_IDS[key] = frozenset(i for i in range(len(tokenizer)) if "\n" in tokenizer.decode([i]))
    return _NEWLINE_IDS[key]


class ListingStop(StoppingCriteria):
    """Per row: done once the generated text has K complete item lines (a newline after the K-th)."""

    def __init__(self, tokenizer, prompt_width: int, k: int, batch: int):
        self.tokenizer, self.width, self.k = tokenizer, prompt_width, k
        self.newlines = newline_token_ids(tokenizer)
        self.line_start = [prompt_width] * batch
        self.items = [0] * batch

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        last = input_ids[:, -1].tolist()
        end = input_ids.shape[1]
        for row, token in enumerate(last):
            if token in self.newlines:
                line = self.tokenizer.decode(input_ids[row, self.line_start[row] : end])
                self.line_start[row] = end
                self.items[row] += is_item_line(line)
            done[row] = self.items[row] >= self.k
        return done


def encode_prompts(tokenizer, prompts: list[list[dict]]) -> list[list[int]]:
    out = []
    for msgs in prompts:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        out.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[list[dict]],
    max_new_tokens: int = 128,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 0.8,
    seed: int = 0,
    progress: str | None = None,
    k: int | None = None,
    constraints=None,
    **gen_kwargs,
) -> list[str]:
    """Decode one response per prompt (greedy by default; seeded sampling when asked), left-padded batches; with
    ``k``, each row stops after its K-th item line."""
    from tqdm.auto import tqdm

    from reward_models.encoding import pad_left

    model.eval()
    device = next(model.parameters()).device
    encoded = encode_prompts(tokenizer, prompts)
    # longest first keeps padding low; results go back in the caller's order
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    if do_sample:
        torch.manual_seed(seed)
    batches = range(0, len(order), batch_size)
    for start in tqdm(batches, desc=progress, disable=progress is None, leave=False):
        idx = order[start : start + batch_size]
        input_ids, mask = pad_left([encoded[i] for i in idx], tokenizer.pad_token_id)
        width = input_ids.shape[1]
        if k:
            gen_kwargs["stopping_criteria"] = StoppingCriteriaList([ListingStop(tokenizer, width, k, len(idx))])
        if constraints is not None:  # rlhf.constrained.PromptConstraints: allowed titles per prompt
            gen_kwargs["logits_processor"] = LogitsProcessorList([constraints.processor(input_ids, mask)])
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **gen_kwargs,
        )
        for row, i in enumerate(idx):
            texts[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True).strip()
    return texts
