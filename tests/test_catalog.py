"""Catalog grounding (exact -> normalised -> fuzzy, README "The response format") and the catalog file."""

import json
import locale
import re

import pytest
from rapidfuzz import fuzz

from rlhf.catalog import Catalog, Grounding, normalise


def catalog(*rows) -> Catalog:
    return Catalog.from_records({"item_id": i, "title": t, "attributes": {"year": y} if y else {}} for i, t, y in rows)


@pytest.mark.parametrize(
    "title, key",
    [
        ("Amélie (2001)", "amelie"),  # accents and year dropped
        ("Léon: The Professional", "leon the professional"),
        ("Matrix, The", "matrix"),  # MovieLens' trailing article
        ("  The  Matrix!! ", "matrix"),
        ("An American Werewolf in London", "american werewolf in london"),
        ("Thelma & Louise", "thelma and louise"),
        ("Thelma and Louise", "thelma and louise"),
    ],
)
def test_normalise(title, key):
    assert normalise(title) == key


def test_exact_grounding_by_title_or_display_in_any_case():
    cat = catalog(("a", "Alien", 1979), ("m", "Malcolm X", 1992), ("t", "Thelma & Louise", 1991))
    for text in ("Alien", "ALIEN (1979)", "alien (1979)", '"Alien"', "*Alien*", "_Alien_", "  Alien  "):
        assert cat.ground(text) == Grounding("a", "exact", 100.0), text
    assert cat.ground("Malcolm X") == Grounding("m", "exact", 100.0)  # a title may end in any letter
    assert cat.ground("Thelma and Louise (1991)") == Grounding("t", "normalised", 100.0)
    assert cat.ground("Alien (1986)") == Grounding("a", "normalised", 100.0)  # a wrong year is no exact match


def test_remakes_take_the_written_year_else_the_first_listed():
    cat = catalog(("old", "Dune", 1984), ("new", "Dune", 2021))
    assert cat.ground("Dune (2021)").item_id == "new" and cat.ground("Dune (1984)").item_id == "old"  # exact
    assert cat.ground("The Dune (2021)") == Grounding("new", "normalised", 100.0)
    assert cat.ground("The Dune (1984)") == Grounding("old", "normalised", 100.0)
    assert cat.ground("The Dune (1999)").item_id == "old" and cat.ground("The Dune").item_id == "old"
    assert cat.ground("Dunee (2021)") == Grounding("new", "fuzzy", pytest.approx(800 / 9))  # ratio 88.9
    assert cat.ground("Dunee").item_id == "old"


# 25 letters with 3 replaced: fuzz.ratio 88; 20 letters with 3 or 4 replaced: 85 or 80
LONG, LONG_3 = "abcdefghijklmnopqrstuvwxy", "abcdefghijklmnopqrstuv123"
SHORT, SHORT_3, SHORT_4 = "abcdefghijklmnopqrst", "123defghijklmnopqrst", "1234efghijklmnopqrst"


def test_fuzzy_thresholds_88_or_80_with_the_year():
    """README: fuzzy grounding at rapidfuzz ratio >= 88, or >= 80 when the written year matches; otherwise none,
    with the best ratio seen."""
    assert (fuzz.ratio(LONG, LONG_3), fuzz.ratio(SHORT, SHORT_3), fuzz.ratio(SHORT, SHORT_4)) == (88, 85, 80)
    assert catalog(("long", LONG, 2000)).ground(LONG_3) == Grounding("long", "fuzzy", 88.0)
    cat = catalog(("short", SHORT, 1990))
    assert cat.ground(SHORT_3) == Grounding(None, "none", 85.0)
    assert cat.ground(f"{SHORT_4} (1990)") == Grounding("short", "fuzzy", 80.0)
    assert cat.ground(f"{SHORT_3} (1990)") == Grounding("short", "fuzzy", 85.0)
    assert cat.ground(f"{SHORT_4} (2000)") == Grounding(None, "none", 80.0)  # the year of another item
    assert cat.ground(SHORT_4) == Grounding(None, "none", 80.0)


def test_fuzzy_looks_at_the_three_nearest_titles_only():
    """A matching year rescues one of the three nearest titles, not a farther one: here three titles at ratio 85
    (another year) stand before the one at 80 with the written year."""
    near = ["123defghijklmnopqrst", "abcdefghijklmnopq123", "abcdefg123klmnopqrst"]
    assert [fuzz.ratio(SHORT, t) for t in near] == [85, 85, 85]
    cat = catalog(*[(f"near{i}", t, 2000) for i, t in enumerate(near)], ("far", SHORT_4, 1990))
    assert cat.ground(f"{SHORT} (1990)") == Grounding(None, "none", 85.0)
    assert catalog(("far", SHORT_4, 1990)).ground(f"{SHORT} (1990)") == Grounding("far", "fuzzy", 80.0)


def test_nothing_to_ground():
    cat = catalog(("a", "Alien", 1979))
    for text in ("", "   ", '""', "**", "!!!", "(1979)"):
        assert cat.ground(text) == Grounding(None, "none", 0.0), text
    assert cat.ground("qqqq") == Grounding(None, "none", 0.0)  # no letter in common
    assert Catalog([]).ground("Alien") == Grounding(None, "none", 0.0)


def test_duplicate_ids_are_refused():
    with pytest.raises(ValueError) as e:
        catalog(("a", "Alien", 1979), ("a", "Aliens", 1986))
    assert str(e.value) == "catalog has duplicate item_id values"


def test_records_to_items():
    cat = Catalog.from_records([{"item_id": 7, "title": 1984}, {"item_id": "d", "title": "D", "description": "x"}])
    assert [(it.item_id, it.title, it.attributes, it.description) for it in cat.items] == [
        ("7", "1984", {}, ""),
        ("d", "D", {}, "x"),
    ]
    assert cat.ground("1984").item_id == "7"


@pytest.fixture
def ascii_locale():
    """The C locale's character set (ASCII) for text files opened without an encoding, while the test runs
    (unless Python runs in UTF-8 mode, where every locale reads as UTF-8)."""
    old = locale.setlocale(locale.LC_CTYPE)
    locale.setlocale(locale.LC_CTYPE, "C")
    yield
    locale.setlocale(locale.LC_CTYPE, old)


def test_save_and_load_jsonl(tmp_path, ascii_locale):
    """The catalog file is UTF-8 as written, whatever the locale."""
    cat = Catalog.from_records(
        [
            {"item_id": "a", "title": "Amélie", "attributes": {"year": 2001, "genres": ["Comedy"]}, "description": "é"},
            {"item_id": "b", "title": "Heat"},
        ]
    )
    path = tmp_path / "catalog.jsonl"
    cat.save_jsonl(path)
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    assert [json.loads(line) for line in lines] == [it.to_record() for it in cat.items]
    assert lines[0] == (
        '{"item_id": "a", "title": "Amélie", "attributes": {"year": 2001, "genres": ["Comedy"]}, "description": "é"}\n'
    )  # UTF-8 as written, not \\u escapes
    assert all(line.endswith("}\n") for line in lines)
    path.write_text(lines[0] + "\n  \n" + lines[1], encoding="utf-8")  # blank lines are skipped, not the end
    again = Catalog.load_jsonl(path)
    assert [it.to_record() for it in again.items] == [it.to_record() for it in cat.items]
    assert again.ground("amelie (2001)").item_id == "a"


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"item_id": "b"}', "needs item_id and title"),
        ('{"title": "B"}', "needs item_id and title"),
        ('{"item_id": "b", "title": ""}', "needs item_id and title"),
        ("{not json", "Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ],
)
def test_a_bad_catalog_row_is_named_by_file_and_line(tmp_path, bad, why):
    path = tmp_path / "catalog.jsonl"
    path.write_text('{"item_id": "a", "title": "A"}\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{re.escape(f'{path}:2: bad catalog row ({why})')}$"):
        Catalog.load_jsonl(path)
