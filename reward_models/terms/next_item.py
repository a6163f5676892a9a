"""The next-item term: on a training prompt, credit for listing what the user actually went on to consume.

A training prompt is built from an earlier part of a training user's history; ``PromptContext.future_ids`` holds
the items that user consumed next (their training future; never a validation or test user's held-out items). The
term is NDCG@K of the listing against that set (rank-shaped: a hit at rank r earns 1/log2(r + 1), over the ideal
for min(|future|, K) hits); prompts without a future (held-out users) score 0.
"""

from __future__ import annotations

from rlhf.listing import parse_and_ground
from rlhf.metrics import ndcg


def score(env, prompts, completions, contexts) -> list[float]:
    out = []
    for text, ctx in zip(completions, contexts):
        future = set(ctx.future_ids) if ctx is not None and ctx.future_ids else set()
        if not future:
            out.append(0.0)
            continue
        items = [e.item_id for e in parse_and_ground(text, env.catalog)]
        out.append(ndcg(items, future, env.k))
    return out


def term(env):
    from functools import partial

    return partial(score, env)
