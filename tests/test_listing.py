import pytest

from rlhf.catalog import Catalog
from rlhf.listing import parse, parse_and_ground, render


@pytest.fixture(scope="module")
def catalog():
    return Catalog.builtin()


def test_render_parse_round_trip(catalog):
    titles = ["The Matrix (1999)", "Dune: Part Two (2024)", "Se7en (1995)"]
    why = ["sci-fi like Inception", "epic like Dune, which you rated 5/5", "dark crime: like Zodiac"]
    text = render(titles, why)
    assert text.splitlines()[1] == "2. Dune: Part Two (2024) — epic like Dune, which you rated 5/5"
    entries = parse_and_ground(text, catalog)
    assert [e.title for e in entries] == titles
    assert [e.explanation for e in entries] == why
    assert all(e.in_catalog for e in entries)


def test_parse_is_forgiving():
    text = (
        "Sure! Here are my picks:\n\n1) **Alien** - horror in space\n"
        "- Heat: a crime epic\n* Inception\n2.   Fargo (1996)—dark comedy\nEnjoy!"
    )
    entries = parse(text)
    assert [(e.rank, e.title, e.explanation) for e in entries] == [
        (1, "Alien", "horror in space"),
        (2, "Heat", "a crime epic"),
        (3, "Inception", ""),
        (4, "Fargo (1996)", "dark comedy"),
    ]


LONG = "a" * 20000


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", []),
        ("I cannot help with that.", []),
        ("1.", []),  # a marker with no title
        ("1.   \n2)\n-\n*  ", []),  # markers with only blanks
        ("\n\n\n", []),
        ("—" * 500, []),  # an em dash is not a bullet
        ("-" * 500, []),  # nor is a rule of hyphens
        ("1. " + LONG, [(1, LONG, "", None)]),  # kept whole, grounded nowhere
        ("100. Alien (1979) — three digits are not a rank", []),
        (
            "1. The Matrix (1999) — <script>x</script>\n2. Heat <|im_end|> — tokens",
            [(1, "The Matrix (1999)", "<script>x</script>", "exact"), (2, "Heat <|im_end|>", "tokens", None)],
        ),
        ("1. **Alien** (1979)\n1. Alien (1979)", [(1, "Alien (1979)", "", "exact"), (2, "Alien (1979)", "", "exact")]),
    ],
)
def test_adversarial_outputs_parse_to_what_they_say(catalog, text, expected):
    """Exactly the entries each text holds: no crash, nothing invented, nothing grounded that is not in the
    catalog; a repeated marker number is renumbered in order (the rank is the position in the list)."""
    entries = parse_and_ground(text, catalog)
    got = [(e.rank, e.title, e.explanation, e.method if e.in_catalog else None) for e in entries]
    assert got == expected


def test_grounding_exact_normalised_fuzzy_none(catalog):
    assert catalog.ground("The Matrix").method == "exact"
    assert catalog.ground("Matrix, The (1999)").method == "normalised"
    assert catalog.ground("the  matrix!!").method == "normalised"
    fz = catalog.ground("The Matirx (1999)")
    assert fz.method == "fuzzy" and catalog[fz.item_id].title == "The Matrix"
    assert catalog.ground("A Film That Does Not Exist (2031)").item_id is None
    assert catalog.ground("").item_id is None
    # remakes: the year picks the right one when titles collide
    cat = Catalog.from_records(
        [
            {"item_id": "a", "title": "Dune", "attributes": {"year": 1984}},
            {"item_id": "b", "title": "Dune", "attributes": {"year": 2021}},
        ]
    )
    assert cat.ground("Dune (2021)").item_id == "b" and cat.ground("Dune (1984)").item_id == "a"


@pytest.mark.parametrize(
    "line, title, why",
    [
        ('1. "Alien" (1979) — horror in space', "Alien (1979)", "horror in space"),
        ("1. “Alien (1979)” — horror in space", "Alien (1979)", "horror in space"),
        ('1. "Heat" — a crime epic', "Heat", "a crime epic"),
        ("1. “Heat”", "Heat", ""),
    ],
)
def test_quotes_around_a_title_are_not_part_of_it(catalog, line, title, why):
    """A model may quote a title, with or without its year inside the quotes: the entry is the bare title and
    the reason alone, and it grounds exactly."""
    (entry,) = parse_and_ground(line, catalog)
    assert (entry.title, entry.explanation, entry.method) == (title, why, "exact")


@pytest.mark.parametrize(
    "line, title, why",
    [
        ("1. __Alien__ (1979) — horror", "Alien (1979)", "horror"),  # underscore bold, like **
        ("1. Heat - a crime epic - with De Niro", "Heat", "a crime epic - with De Niro"),  # the first separator splits
        ("1. X-Men (2000) — mutants", "X-Men (2000)", "mutants"),  # titles may begin or end with any letter
        ("1. Malcolm X — a biopic", "Malcolm X", "a biopic"),
        ("1. Malcolm X", "Malcolm X", ""),
    ],
)
def test_title_and_reason_split(line, title, why):
    (entry,) = parse(line)
    assert (entry.title, entry.explanation) == (title, why)


def test_render_refuses_a_title_without_its_explanation():
    with pytest.raises(ValueError) as e:
        render(["Alien (1979)", "Heat (1995)"], ["horror"])
    assert str(e.value) == "render needs one explanation per title"


def test_a_colon_in_a_title_written_without_its_year_stays_in_the_title():
    cat = Catalog.builtin()
    space = cat.ground("2001: A Space Odyssey (1968)").item_id
    (e,) = parse_and_ground("1. 2001: A Space Odyssey", cat)
    assert (e.title, e.explanation, e.item_id) == ("2001: A Space Odyssey", "", space)
    (e,) = parse_and_ground("1. 2001: A Space Odyssey — cerebral sci-fi", cat)  # the dash splits first
    assert (e.title, e.explanation, e.item_id) == ("2001: A Space Odyssey", "cerebral sci-fi", space)
    (e,) = parse_and_ground("1. Heat: a crime epic", cat)  # a reason after a colon stays a reason
    assert (e.title, e.explanation) == ("Heat", "a crime epic") and e.item_id == cat.ground("Heat").item_id


def test_a_colon_joins_title_and_reason_only_when_the_split_title_is_unknown_and_the_whole_is_exact():
    """The join is a repair for a title the colon cut: a title that grounds as written keeps its reason, even when
    title and reason together name another item; a whole that grounds only fuzzily is not taken."""
    cat = Catalog.from_records(
        {"item_id": i, "title": t, "attributes": {"year": y}}
        for i, t, y in [("a", "Alien", 1979), ("b", "Alien: Resurrection", 1997), ("c", "2001: A Space Odyssey", 1968)]
    )
    (e,) = parse_and_ground("1. Alien: Resurrection", cat)  # "Alien" grounds exactly: the rest is its reason
    assert (e.title, e.explanation, e.item_id) == ("Alien", "Resurrection", "a")
    (e,) = parse_and_ground("1. 2001: A Space Odysey", cat)  # misspelt: the whole grounds fuzzily only
    assert cat.ground("2001: A Space Odysey").method == "fuzzy"
    assert (e.title, e.explanation, e.item_id, e.method) == ("2001", "A Space Odysey", None, "none")
