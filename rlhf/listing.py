"""The ranked-list response format: render it (SFT targets) and parse it (rewards, evaluation).

    1. The Matrix (1999) — a cerebral sci-fi action film like Inception, which you rated 5/5.

One parser serves rewards and evaluation. It accepts numbers, bullets or dashes as markers, an em
dash, en dash, hyphen or colon before the explanation, missing years, bold markup, and chatter
before or after the list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rlhf.catalog import Catalog, Grounding

SEPARATOR = " — "
_MARKER = re.compile(r"^\s*(?:(\d{1,2})\s*[.)]|[-*•])\s+(.*\S)\s*$")
# explanation separators, strongest first; " - " only when it is surrounded by spaces
_SEPARATORS = (" — ", " – ", " -- ", " - ", ": ")


@dataclass
class Entry:
    rank: int
    title: str
    explanation: str


@dataclass
class GroundedEntry(Entry):
    item_id: str | None
    method: str

    @property
    def in_catalog(self) -> bool:
        return self.item_id is not None


def render(titles: list[str], explanations: list[str]) -> str:
    """The SFT target: exactly one numbered line per item."""
    if len(titles) != len(explanations):
        raise ValueError("render needs one explanation per title")
    return "\n".join(f"{i}. {t}{SEPARATOR}{e}" for i, (t, e) in enumerate(zip(titles, explanations), 1))


# a closing quote may follow the year: “Alien (1979)” — why
_AFTER_YEAR = re.compile(r"^(.*?\(\d{4}\))[\"”]?\s*(?:[—–:]|-{1,2})?\s*(.*)$")
_QUOTED = re.compile(r'^["“]([^"“”]+)["”](\s*\(\d{4}\))?$')  # "Alien" (1979)


def _unquote(title: str) -> str:
    """The title without quotes around it, whether the year is inside them or not."""
    m = _QUOTED.match(title.strip())
    return m.group(1).strip() + (m.group(2) or "") if m else title.strip().strip('"“”')


def _split_entry(body: str) -> tuple[str, str]:
    body = body.replace("**", "").replace("__", "").strip()
    m = _AFTER_YEAR.match(body)  # "Title (Year) — why": the year ends the title, colons and all
    if m:
        return _unquote(m.group(1)), m.group(2).strip()
    for sep in _SEPARATORS:
        if sep in body:
            title, why = body.split(sep, 1)
            return _unquote(title), why.strip()
    return _unquote(body), ""


def parse(text: str) -> list[Entry]:
    """Ordered entries of the first list in ``text``; lines outside the list are ignored."""
    entries: list[Entry] = []
    for line in text.splitlines():
        m = _MARKER.match(line)
        if not m:
            continue
        title, why = _split_entry(m.group(2))
        if title:
            entries.append(Entry(len(entries) + 1, title, why))
    return entries


def ground(entries: list[Entry], catalog: Catalog) -> list[GroundedEntry]:
    out = []
    for e in entries:
        title, why = e.title, e.explanation
        g: Grounding = catalog.ground(title)
        if g.item_id is None and why:
            # a colon may belong to the title ("2001: A Space Odyssey" written without its year): when the line
            # split at it grounds exactly as a whole, the whole is the title
            whole = catalog.ground(f"{title}: {why}")
            if whole.item_id is not None and whole.method != "fuzzy":
                title, why, g = f"{title}: {why}", "", whole
        out.append(GroundedEntry(e.rank, title, why, g.item_id, g.method))
    return out


def parse_and_ground(text: str, catalog: Catalog) -> list[GroundedEntry]:
    return ground(parse(text), catalog)
