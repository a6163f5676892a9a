"""Batched generation from chat prompts: the one path SFT samples, eval, recommend and labeling use."""

from __future__ import annotations

import torch


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
    **gen_kwargs,
) -> list[str]:
    """Decode one response per prompt (greedy by default; seeded sampling when asked), left-padded batches."""
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
