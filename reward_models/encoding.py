"""Token layout shared by reward training, reward scoring in eval, and PPO rollouts.

PPO scores ``prompt ids (chat template + assistant header) + response ids + EOS``. Training the reward
model on that exact layout (rather than on the chat template's rendering of a full conversation,
which adds a trailing newline) means the head reads the same final token in training and in PPO.
"""

from __future__ import annotations

import torch

ASSISTANT_HEADER = "<|im_start|>assistant\n"


def header_end(ids: list[int], header: list[int]) -> int | None:
    """Index just past the last occurrence of ``header`` (the assistant turn's opening tokens) in ``ids``."""
    h = len(header)
    for start in range(len(ids) - h, -1, -1):
        if ids[start : start + h] == header:
            return start + h
    return None


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def response_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def encode(tokenizer, messages: list[dict], text: str) -> list[int]:
    return prompt_ids(tokenizer, messages) + response_ids(tokenizer, text)


def pad_left(seqs: list[list[int]], pad_id: int):
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], pad_id: int, batch_size: int = 16) -> list[float]:
    """Scalar reward of each token sequence from a sequence-classification reward model."""
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    for s in range(0, len(seqs), batch_size):
        ids, mask = pad_left(seqs[s : s + batch_size], pad_id)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        out.extend(logits[:, 0].float().cpu().tolist())
    return out
