"""Renders the prompts/ templates from a user's history, within a token budget.

Item text comes from data and may be hostile ("Ignore previous instructions..."). It is placed inside
<history>/<candidates> fences the system message declares to be data, quoted, stripped of newlines,
chat-template control sequences and fence tags, and cut to a bounded length. When the rendered
prompt exceeds the budget, the oldest history items are dropped first.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import jinja2

from rlhf.catalog import Catalog

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
DEFAULT_TEMPLATE = "recommend-v1"
MAX_TITLE_CHARS = 120
_CONTROL = re.compile(r"<\|[^|>]*\|>|</?\s*(history|candidates)\s*>|[\x00-\x1f\x7f]", re.IGNORECASE)


def sanitize(text: str, limit: int = MAX_TITLE_CHARS) -> str:
    """One line of inert data: no control tokens, no fence tags, no newlines, bounded length."""
    t = _CONTROL.sub(" ", str(text))
    t = t.replace('"', "'")
    t = re.sub(r"\s+", " ", t).strip()
    return t if len(t) <= limit else t[: limit - 1].rstrip() + "…"


class PromptBuilder:
    def __init__(
        self,
        catalog: Catalog,
        tokenizer=None,
        template: str = DEFAULT_TEMPLATE,
        k: int = 5,
        max_prompt_tokens: int = 320,
        noun: str = "films",
        ranked: bool = False,
    ):
        folder = PROMPTS_DIR / template
        if not folder.is_dir():
            raise FileNotFoundError(f"prompt template {template!r} not found under {PROMPTS_DIR}")
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(folder),
            autoescape=False,
            undefined=jinja2.StrictUndefined,
            keep_trailing_newline=False,
        )
        self.system_t = env.get_template("system.j2")
        self.user_t = env.get_template("user.j2")
        self.catalog, self.tokenizer, self.template, self.k = catalog, tokenizer, template, k
        self.max_prompt_tokens, self.noun, self.ranked = max_prompt_tokens, noun, ranked

    def _item_view(self, item_id: str, rating: float | None = None) -> dict:
        it = self.catalog[item_id]
        r = None if rating is None or (isinstance(rating, float) and math.isnan(rating)) else rating
        return {
            "title": sanitize(it.display),
            "genres": sanitize(", ".join(it.genres[:3]), 60),
            "rating": (int(r) if float(r).is_integer() else r) if r is not None else None,
        }

    def messages(self, history: list[tuple[str, float]], candidates: list[str] | None = None) -> list[dict]:
        return self.build(history, candidates)[0]

    def build(self, history: list[tuple[str, float]], candidates: list[str] | None = None):
        """(chat messages, the history actually shown) for (item_id, rating) pairs oldest first, trimmed
        to the token budget by dropping the oldest items."""
        if not history:
            raise ValueError("cannot build a prompt from an empty history")
        hist = list(history)
        cands = [self._item_view(c) for c in candidates] if candidates else []
        while True:
            msgs = [
                {
                    "role": "system",
                    "content": self.system_t.render(k=self.k, noun=self.noun, candidates=bool(cands)).strip(),
                },
                {
                    "role": "user",
                    "content": self.user_t.render(
                        history=[self._item_view(i, r) for i, r in hist],
                        candidates=cands,
                        ranked=self.ranked,
                        k=self.k,
                        noun=self.noun,
                    ).strip(),
                },
            ]
            if self.tokenizer is None or len(hist) == 1 or self.count_tokens(msgs) <= self.max_prompt_tokens:
                return msgs, hist
            hist = hist[1:]  # oldest first out

    def count_tokens(self, msgs: list[dict]) -> int:
        ids = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return len(ids)
