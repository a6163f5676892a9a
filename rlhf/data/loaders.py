"""Loaders for real logs -> one canonical items catalog and interactions table.

Canonical interaction columns: ``user_id`` (str), ``item_id`` (str), ``timestamp`` (int, seconds),
``rating`` (float, NaN when unknown), ``event`` (view | click | purchase | rating | impression |
to_read), ``impression_id`` (str, "" when none), ``position`` (int, -1 when none), ``text`` (review
text, "" when none).

Bad input policy (also in the README):
- a row with too few fields (or a CSV field over 131,072 characters), a non-numeric rating, or an
  unparsable timestamp: skipped, counted under its reason, the first examples kept as ``file:line: detail``
  (the line a record starts on);
- an interaction whose item is not in the items file: skipped and counted (``unknown_item``);
- an exact duplicate (same user, item, timestamp, event): kept once, the rest counted;
- a missing or empty file, a CSV header without a column the source needs, a file that is not UTF-8
  (except MovieLens-100K's Latin-1 ``u.item``), or a source where every row was skipped: a ``DataError``
  naming the file and what would fix it.

Rows are read as a stream (a CSV record may span lines inside quotes) and collected in Arrow record
batches, so memory holds columnar data, never one Python object per row.
"""

from __future__ import annotations

import csv
import glob
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from rlhf.catalog import Catalog, Item, split_year

SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("timestamp", pa.int64()),
        ("rating", pa.float64()),
        ("event", pa.string()),
        ("impression_id", pa.string()),
        ("position", pa.int32()),
        ("text", pa.string()),
    ]
)
BATCH_ROWS = 100_000
MAX_FIELD_CHARS = 20_000  # longer review texts are truncated (and counted)
ML100K_GENRES = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]


class DataError(RuntimeError):
    """A source that cannot be loaded at all; the message names the file and the fix."""


@dataclass
class SkipLog:
    counts: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 5:
            ex.append(f"{where}: {detail}"[:300])

    def to_dict(self) -> dict:
        return {"counts": dict(self.counts), "examples": self.examples, "total": int(sum(self.counts.values()))}


class _Collector:
    """Appends canonical rows column-wise and freezes them into Arrow batches every BATCH_ROWS."""

    def __init__(self):
        self.batches: list[pa.RecordBatch] = []
        self._cols = {n: [] for n in SCHEMA.names}

    def add(self, user_id, item_id, timestamp, rating=math.nan, event="rating", impression_id="", position=-1, text=""):
        c = self._cols
        c["user_id"].append(str(user_id))
        c["item_id"].append(str(item_id))
        c["timestamp"].append(int(timestamp))
        c["rating"].append(float(rating))
        c["event"].append(event)
        c["impression_id"].append(impression_id)
        c["position"].append(int(position))
        c["text"].append(text)
        if len(c["user_id"]) >= BATCH_ROWS:
            self._flush()

    def _flush(self):
        if self._cols["user_id"]:
            self.batches.append(pa.RecordBatch.from_pydict(self._cols, schema=SCHEMA))
            self._cols = {n: [] for n in SCHEMA.names}

    def table(self) -> pa.Table:
        self._flush()
        return pa.Table.from_batches(self.batches, schema=SCHEMA) if self.batches else SCHEMA.empty_table()


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: not found ({what})")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty ({what})")
    return path


def _lines(path: Path, encoding: str = "utf-8", keepends: bool = False):
    """Yield (lineno, text) and turn a decoding failure into an error naming the line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                text = raw.decode(encoding)
                yield lineno, text if keepends else text.rstrip("\r\n")
            except UnicodeDecodeError:
                raise DataError(
                    f"{path}:{lineno}: not valid {encoding}; re-encode the file as UTF-8 "
                    f"(e.g. iconv -f latin1 -t utf-8)"
                ) from None


def _csv_rows(path: Path, encoding="utf-8", required=()):
    """(lineno, record, detail) per CSV record, streaming; lineno is the line the record starts on.

    The file is parsed as CSV, not cut into lines first, so a quoted field may hold newlines (descriptions,
    titles). The header defines the keys; a column of ``required`` missing from it (a tuple: one of them) is
    a DataError naming the file. A record with fewer fields than the header, or with a field over the csv
    module's limit (131,072 characters, which also bounds what an unclosed quote can swallow), comes back as
    (lineno, None, why) and reading goes on with the next line.
    """
    reader = csv.reader(text for _, text in _lines(path, encoding, keepends=True))
    header = None
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            yield start, None, str(e)
            continue
        if len(fields) <= 1 and not "".join(fields).strip():
            continue  # a blank line
        if header is None:
            header = [h.strip().lstrip("\ufeff") for h in fields]
            missing = [
                "/".join(c) if isinstance(c, tuple) else c
                for c in required
                if not (set(c) if isinstance(c, tuple) else {c}) & set(header)
            ]
            if missing:
                raise DataError(
                    f"{path}:{start}: missing column(s) {', '.join(missing)}; the header has {', '.join(header)}"
                )
            continue
        if len(fields) < len(header):
            yield start, None, f"expected {len(header)} fields, got {len(fields)}"
        else:
            yield start, dict(zip(header, fields)), ""


def _parse_ts(value) -> int:
    """Seconds since the epoch from seconds, milliseconds or an ISO date."""
    if value is None or value == "":
        raise ValueError("empty timestamp")
    try:
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"bad timestamp {value!r}")
        return int(v / 1000) if v > 1e11 else int(v)
    except (TypeError, ValueError):
        pass
    try:
        return int(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise ValueError(f"bad timestamp {value!r}") from None


def _parse_rating(value) -> float:
    if value is None or value == "":
        return math.nan
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"bad rating {value!r}")
    return v


def _clip_text(text, skips: SkipLog) -> str:
    text = "" if text is None else str(text)
    if len(text) > MAX_FIELD_CHARS:
        skips.counts["truncated_text"] += 1
        return text[:MAX_FIELD_CHARS]
    return text


def _catalog(items: list[Item], skips: SkipLog, where) -> Catalog:
    """The catalog of each id's first row; a later row with the same id is skipped and counted."""
    seen, unique = set(), []
    for it in items:
        if it.item_id in seen:
            skips.skip("duplicate_item", str(where), f"item id {it.item_id!r} again; its first row is kept")
            continue
        seen.add(it.item_id)
        unique.append(it)
    return Catalog(unique)


# -- MovieLens ---------------------------------------------------------------------------------
def load_movielens_100k(folder: Path, skips: SkipLog):
    items = []
    for lineno, line in _lines(_need(folder / "u.item", "MovieLens-100K items"), "latin-1"):
        parts = line.split("|")
        if len(parts) < 5 + len(ML100K_GENRES):
            skips.skip("malformed_item", f"{folder / 'u.item'}:{lineno}", f"{len(parts)} fields")
            continue
        title, year = split_year(parts[1])
        genres = [
            g
            for g, flag in zip(ML100K_GENRES, parts[5 : 5 + len(ML100K_GENRES)])
            if flag.strip() == "1" and g != "unknown"
        ]
        items.append(Item(parts[0], title, {"year": year, "genres": genres}))
    catalog = _catalog(items, skips, folder / "u.item")
    rows = _Collector()
    data = _need(folder / "u.data", "MovieLens-100K ratings")
    for lineno, line in _lines(data):
        parts = line.split("\t")
        where = f"{data}:{lineno}"
        if len(parts) != 4:
            skips.skip("malformed_row", where, f"expected 4 tab-separated fields, got {len(parts)}")
            continue
        _add_rating(rows, skips, catalog, where, parts[0], parts[1], parts[2], parts[3])
    return catalog, rows.table()


def _add_rating(rows, skips, catalog, where, user, item, rating, ts, event="rating", text=""):
    if not user or not item:
        skips.skip("missing_id", where, "empty user or item id")
        return
    if item not in catalog:
        skips.skip("unknown_item", where, f"item {item!r} not in the items file")
        return
    try:
        r = _parse_rating(rating)
    except ValueError:
        skips.skip("bad_rating", where, f"rating {rating!r}")
        return
    try:
        t = _parse_ts(ts)
    except ValueError as e:
        skips.skip("bad_timestamp", where, str(e))
        return
    rows.add(user, item, t, r, event, text=text)


def load_movielens(folder: Path, skips: SkipLog):
    movies = _need(folder / "movies.csv", "MovieLens movies.csv")
    items = []
    for lineno, rec, why in _csv_rows(movies, required=("movieId", "title")):
        if rec is None or not rec.get("movieId") or not rec.get("title"):
            skips.skip("malformed_item", f"{movies}:{lineno}", why or "needs movieId,title,genres")
            continue
        title, year = split_year(rec["title"])
        genres = [g for g in (rec.get("genres") or "").split("|") if g and g != "(no genres listed)"]
        items.append(Item(rec["movieId"], title, {"year": year, "genres": genres}))
    catalog = _catalog(items, skips, movies)
    rows = _Collector()
    ratings = _need(folder / "ratings.csv", "MovieLens ratings.csv")
    for lineno, rec, why in _csv_rows(ratings, required=("userId", "movieId", "rating", "timestamp")):
        where = f"{ratings}:{lineno}"
        if rec is None:
            skips.skip("malformed_row", where, why)
            continue
        _add_rating(
            rows, skips, catalog, where, rec.get("userId"), rec.get("movieId"), rec.get("rating"), rec.get("timestamp")
        )
    return catalog, rows.table()


# -- goodbooks-10k -----------------------------------------------------------------------------
def load_goodbooks(folder: Path, skips: SkipLog):
    books = folder / "books.csv"
    if not books.exists() and (folder / "sample_books.csv").exists():
        books = folder / "sample_books.csv"
    items = []
    books_required = ("book_id", ("title", "original_title"))
    for lineno, rec, why in _csv_rows(_need(books, "goodbooks books.csv"), required=books_required):
        if rec is None or not rec.get("book_id") or not (rec.get("title") or rec.get("original_title")):
            skips.skip("malformed_item", f"{books}:{lineno}", why or "needs book_id and title")
            continue
        year = rec.get("original_publication_year")
        try:
            year = int(float(year)) if year else None
        except ValueError:
            year = None
        title = rec.get("original_title") or rec["title"]
        attrs = {"year": year, "authors": [a.strip() for a in (rec.get("authors") or "").split(",") if a.strip()]}
        items.append(Item(rec["book_id"], title, attrs, description=rec.get("title", "")))
    catalog = _catalog(items, skips, books)
    rows = _Collector()
    ratings = folder / "ratings.csv"
    if not ratings.exists() and (folder / "sample_ratings.csv").exists():
        ratings = folder / "sample_ratings.csv"
    # goodbooks has no timestamps: the file order within a user stands in for time (documented)
    ratings_required = ("user_id", "book_id", "rating")
    for lineno, rec, why in _csv_rows(_need(ratings, "goodbooks ratings.csv"), required=ratings_required):
        where = f"{ratings}:{lineno}"
        if rec is None:
            skips.skip("malformed_row", where, why)
            continue
        _add_rating(rows, skips, catalog, where, rec.get("user_id"), rec.get("book_id"), rec.get("rating"), lineno)
    to_read = folder / ("to_read.csv" if (folder / "to_read.csv").exists() else "sample_to_read.csv")
    if to_read.exists() and to_read.stat().st_size:
        for lineno, rec, why in _csv_rows(to_read, required=("user_id", "book_id")):
            where = f"{to_read}:{lineno}"
            if rec is None:
                skips.skip("malformed_row", where, why)
                continue
            _add_rating(
                rows, skips, catalog, where, rec.get("user_id"), rec.get("book_id"), "", lineno, event="to_read"
            )
    return catalog, rows.table()


# -- Amazon reviews (2018 and 2023 releases) ----------------------------------------------------
def _jsonl(path: Path, skips: SkipLog):
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            skips.skip("malformed_json", f"{path}:{lineno}", str(e))
            continue
        if not isinstance(rec, dict):
            skips.skip("malformed_json", f"{path}:{lineno}", "not a JSON object")
            continue
        yield lineno, rec


def load_amazon(path: Path, meta_path: str, skips: SkipLog):
    reviews = _need(path, "Amazon reviews JSONL")
    if meta_path:
        meta = _need(Path(meta_path), "Amazon metadata JSONL")
    else:
        found = sorted(glob.glob(str(reviews.parent / "meta*.jsonl")))
        if not found:
            raise DataError(f"{reviews.parent}: no meta*.jsonl beside the reviews; pass --meta-path")
        meta = _need(Path(found[0]), "Amazon metadata JSONL")
    items = []
    for lineno, rec in _jsonl(meta, skips):
        iid = rec.get("parent_asin") or rec.get("asin")
        title = rec.get("title")
        if not iid or not title or not isinstance(title, str):
            skips.skip("malformed_item", f"{meta}:{lineno}", "needs asin/parent_asin and title")
            continue
        cats = rec.get("categories") or rec.get("category") or []
        if cats and isinstance(cats[0], list):  # 2018: list of category paths
            cats = cats[0]
        desc = rec.get("description") or ""
        if isinstance(desc, list):
            desc = " ".join(map(str, desc))
        attrs = {"genres": [str(c) for c in cats][-3:], "brand": rec.get("store") or rec.get("brand") or ""}
        items.append(Item(str(iid), title.strip()[:300], attrs, _clip_text(desc, skips)[:500]))
    catalog = _catalog(items, skips, meta)
    rows = _Collector()
    for lineno, rec in _jsonl(reviews, skips):
        where = f"{reviews}:{lineno}"
        user = rec.get("user_id") or rec.get("reviewerID")
        item = rec.get("parent_asin") or rec.get("asin")
        rating = rec.get("rating", rec.get("overall"))
        ts = rec.get("timestamp", rec.get("unixReviewTime"))
        text = rec.get("text") or rec.get("reviewText") or ""
        summary = rec.get("title") or rec.get("summary") or ""
        full = (f"{summary}. {text}" if summary else str(text)).strip()
        _add_rating(rows, skips, catalog, where, user, item, rating, ts, text=_clip_text(full, skips))
    return catalog, rows.table()


# -- generic CSV / JSONL / Parquet ---------------------------------------------------------------
def _records(path: Path, skips: SkipLog, required=()):
    """(number, record) per row of a CSV, JSONL or Parquet file; ``required`` columns as in ``_csv_rows``
    (checked against a CSV header or the Parquet schema; JSONL rows have none, so they are checked per row)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        names = set(pf.schema_arrow.names)
        missing = [c for c in required if not (set(c) if isinstance(c, tuple) else {c}) & names]
        if missing:
            raise DataError(f"{path}: missing column(s) {missing}; it has {sorted(names)}")
        n = 0
        for batch in pf.iter_batches(batch_size=50_000):
            for rec in batch.to_pylist():
                n += 1
                yield n, rec
    elif suffix in (".jsonl", ".json"):
        yield from _jsonl(path, skips)
    else:
        for lineno, rec, why in _csv_rows(path, required=required):
            if rec is None:
                skips.skip("malformed_row", f"{path}:{lineno}", why)
                continue
            yield lineno, rec


def load_generic(path: Path, columns: dict, items_path: str, skips: SkipLog):
    cols = {
        "user_id": "user_id",
        "item_id": "item_id",
        "timestamp": "timestamp",
        "rating": "rating",
        "title": "title",
        "event": "event",
        **(columns or {}),
    }
    src = _need(path, "generic interactions file")
    items: dict[str, Item] = {}
    if items_path:
        ip = _need(Path(items_path), "generic items file")
        item_cols = ((cols["item_id"], "item_id"), (cols["title"], "title"))
        for lineno, rec in _records(ip, skips, required=item_cols):
            iid, title = rec.get(cols["item_id"]) or rec.get("item_id"), rec.get(cols["title"]) or rec.get("title")
            if not iid or not title:
                skips.skip("malformed_item", f"{ip}:{lineno}", "needs item_id and title")
                continue
            if str(iid) in items:
                skips.skip("duplicate_item", f"{ip}:{lineno}", f"item id {iid!r} again; its first row is kept")
                continue
            attrs = {k: v for k, v in rec.items() if k not in (cols["item_id"], cols["title"], "item_id", "title")}
            items[str(iid)] = Item(str(iid), str(title)[:300], attrs)
    rows = _Collector()
    pending_titles = not items_path
    # the ids, and every column the recipe names, must exist: a misspelt mapping is an error, not NaN ratings
    named = [v for k, v in (columns or {}).items() if not (items_path and k == "title")]  # titles: the items file
    required = dict.fromkeys([cols["user_id"], cols["item_id"], *named])
    for lineno, rec in _records(src, skips, required=tuple(required)):
        where = f"{src}:{lineno}"
        iid = rec.get(cols["item_id"])
        if pending_titles and iid not in (None, "") and str(iid) not in items:
            title = rec.get(cols["title"]) or str(iid)
            items[str(iid)] = Item(str(iid), str(title)[:300], {})
        ts = rec.get(cols["timestamp"])
        if ts in (None, ""):
            ts = lineno  # no time column: file order stands in for time
        _add_rating(
            rows,
            skips,
            items,
            where,
            rec.get(cols["user_id"]),
            None if iid is None else str(iid),
            rec.get(cols["rating"]),
            ts,
            event=str(rec.get(cols["event"]) or "rating"),
        )
    return Catalog(list(items.values())), rows.table()


# -- built-in: catalog + simulator -------------------------------------------------------------
def load_builtin(cfg, skips: SkipLog):
    from rlhf.data.simulator import Simulator

    try:
        catalog = (
            Catalog.load_jsonl(_need(Path(cfg.catalog), "data.catalog JSONL")) if cfg.catalog else Catalog.builtin()
        )
    except ValueError as e:  # a bad row (the message names file and line) or repeated ids (it does not)
        where = str(Path(cfg.catalog))
        raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
    sim = Simulator(catalog, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    rows = _Collector()
    for u in range(cfg.num_users):
        uid = f"u{u:05d}"
        user = sim.user(uid)
        length = int(max(2, rng.poisson(cfg.interactions_per_user)))
        hist = sim.history(user, length, rng)
        for r in hist:
            rows.add(uid, r["item_id"], r["timestamp"], r["rating"], "rating")
        seen = {r["item_id"] for r in hist}
        for k in range(cfg.impressions_per_user):
            ts = hist[-1]["timestamp"] - 86400 * (k + 1) if hist else 0  # logged before the held-out tail
            for shown in sim.impression(user, rng, seen):
                rows.add(
                    uid,
                    shown["item_id"],
                    ts,
                    math.nan,
                    "click" if shown["clicked"] else "impression",
                    impression_id=f"{uid}-imp{k}",
                    position=shown["position"],
                )
    return catalog, rows.table(), sim


def load_source(cfg, skips: SkipLog):
    """Dispatch on ``cfg.source``; returns (catalog, interactions table)."""
    path = Path(cfg.path) if cfg.path else None
    if cfg.source == "builtin":
        catalog, table, _ = load_builtin(cfg, skips)
    elif cfg.source == "movielens-100k":
        catalog, table = load_movielens_100k(path, skips)
    elif cfg.source == "movielens":
        catalog, table = load_movielens(path, skips)
    elif cfg.source == "goodbooks":
        catalog, table = load_goodbooks(path, skips)
    elif cfg.source == "amazon":
        catalog, table = load_amazon(path, cfg.meta_path, skips)
    else:
        catalog, table = load_generic(path, cfg.columns, cfg.items_path, skips)
    if table.num_rows == 0:
        raise DataError(
            f"{cfg.path or 'builtin'}: no usable interactions "
            f"(skipped: {dict(skips.counts) or 'none'}); check the source type and files"
        )
    return catalog, dedupe(table, skips)


def dedupe(table: pa.Table, skips: SkipLog) -> pa.Table:
    """Drop exact repeats of (user, item, timestamp, event, impression) with numpy, counting them."""
    if table.num_rows == 0:
        return table
    # integer codes from Arrow's dictionary encoding: no Python string object per row
    keys = [
        table.column(c).combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)
        for c in ("user_id", "item_id", "event", "impression_id")
    ]
    ts = table.column("timestamp").to_numpy()
    order = np.lexsort([ts, *keys[::-1]])
    stacked = np.stack([*[k[order] for k in keys], ts[order]], axis=1)
    dup = np.zeros(len(order), dtype=bool)
    dup[1:] = (stacked[1:] == stacked[:-1]).all(axis=1)
    n = int(dup.sum())
    if n:
        skips.counts["duplicate_row"] += n
        keep = np.sort(order[~dup])
        table = table.take(pa.array(keep))
    return table
