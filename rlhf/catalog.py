"""Items: lookup by id or title, and grounding of free-text titles (exact -> normalised -> fuzzy)."""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from rapidfuzz import fuzz, process

BUILTIN_CATALOG = Path(__file__).resolve().parent.parent / "data" / "films.jsonl"
_YEAR = re.compile(r"\s*\((\d{4})\)\s*$")
_ARTICLE = re.compile(r"^(the|a|an)\s+")
_TRAILING_ARTICLE = re.compile(r",\s*(the|a|an)$")  # MovieLens writes "Matrix, The"


@dataclass
class Item:
    item_id: str
    title: str
    attributes: dict = field(default_factory=dict)
    description: str = ""

    @property
    def year(self):
        return self.attributes.get("year")

    @property
    def genres(self) -> list[str]:
        return list(self.attributes.get("genres") or [])

    @property
    def display(self) -> str:
        """Title as it appears in listings: 'Title (Year)' when the year is known."""
        return f"{self.title} ({self.year})" if self.year else self.title

    def to_record(self) -> dict:
        return {
            "item_id": self.item_id,
            "title": self.title,
            "attributes": self.attributes,
            "description": self.description,
        }


def normalise(title: str) -> str:
    """Lower-case, accents and punctuation stripped, year and leading/trailing article dropped."""
    t = unicodedata.normalize("NFKD", title).encode("ascii", "ignore").decode()
    t = _YEAR.sub("", t.strip()).lower().strip()
    t = _TRAILING_ARTICLE.sub("", t)
    t = t.replace("&", " and ")
    t = re.sub(r"[^a-z0-9]+", " ", t).strip()
    return _ARTICLE.sub("", t)


def split_year(text: str) -> tuple[str, int | None]:
    m = _YEAR.search(text)
    return (text[: m.start()].strip(), int(m.group(1))) if m else (text.strip(), None)


@dataclass
class Grounding:
    item_id: str | None
    method: str  # exact | normalised | fuzzy | none
    score: float

    @property
    def in_catalog(self) -> bool:
        return self.item_id is not None


class Catalog:
    """An immutable set of items with fast title grounding."""

    def __init__(self, items: list[Item], fuzzy_threshold: float = 88.0, fuzzy_with_year: float = 80.0):
        self.items = list(items)
        self.by_id = {it.item_id: it for it in self.items}
        if len(self.by_id) != len(self.items):
            raise ValueError("catalog has duplicate item_id values")
        self.fuzzy_threshold, self.fuzzy_with_year = fuzzy_threshold, fuzzy_with_year
        self._exact: dict[str, str] = {}
        self._norm: dict[str, list[str]] = {}
        for it in self.items:
            self._exact.setdefault(it.display.lower(), it.item_id)
            self._exact.setdefault(it.title.lower(), it.item_id)
            self._norm.setdefault(normalise(it.title), []).append(it.item_id)
        self._norm_keys = list(self._norm)

    def __len__(self):
        return len(self.items)

    def __contains__(self, item_id):
        return item_id in self.by_id

    def __getitem__(self, item_id) -> Item:
        return self.by_id[item_id]

    def ground(self, text: str) -> Grounding:
        """Map a title as written (maybe with year, odd case, typos) to an item id, or none."""
        text = text.strip().strip("\"'*_").strip()
        if not text:
            return Grounding(None, "none", 0.0)
        hit = self._exact.get(text.lower())
        if hit:
            return Grounding(hit, "exact", 100.0)
        title, year = split_year(text)
        key = normalise(title)
        ids = self._norm.get(key)
        if ids:
            return Grounding(self._pick_year(ids, year), "normalised", 100.0)
        if not key or not self._norm_keys:
            return Grounding(None, "none", 0.0)
        best_score = 0.0
        for cand, score, _ in process.extract(key, self._norm_keys, scorer=fuzz.ratio, limit=3):
            best_score = max(best_score, score)
            ids = self._norm[cand]
            # a typo in a short title costs many points; a matching year is evidence enough for 80+
            year_ok = year is not None and any(self.by_id[i].year == year for i in ids)
            if score >= self.fuzzy_threshold or (year_ok and score >= self.fuzzy_with_year):
                return Grounding(self._pick_year(ids, year), "fuzzy", float(score))
        return Grounding(None, "none", float(best_score))

    def _pick_year(self, ids: list[str], year: int | None) -> str:
        if year is not None:
            for i in ids:
                if self.by_id[i].year == year:
                    return i
        return ids[0]

    # -- persistence ---------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records) -> Catalog:
        return cls(
            [
                Item(
                    str(r["item_id"]), str(r["title"]), dict(r.get("attributes") or {}), str(r.get("description") or "")
                )
                for r in records
            ]
        )

    @classmethod
    def load_jsonl(cls, path: str | Path) -> Catalog:
        path = Path(path)
        records = []
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = json.loads(line)
                    if not r.get("item_id") or not r.get("title"):
                        raise ValueError("needs item_id and title")
                except (json.JSONDecodeError, ValueError) as e:
                    raise ValueError(f"{path}:{lineno}: bad catalog row ({e})") from None
                records.append(r)
        return cls.from_records(records)

    @classmethod
    def builtin(cls) -> Catalog:
        return cls.load_jsonl(BUILTIN_CATALOG)

    def save_jsonl(self, path: str | Path) -> None:
        with Path(path).open("w", encoding="utf-8") as f:
            for it in self.items:
                f.write(json.dumps(it.to_record(), ensure_ascii=False) + "\n")
