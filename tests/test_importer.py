"""`rlhf label import` on a round written by hand (no model, no server): the rules in rlhf/labeling/importer.py's
docstring and the README's "Labeling rounds", one by one, with every figure of summary.json worked out by hand."""

from __future__ import annotations

import calendar
import json
import re
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from rlhf.labeling.importer import fleiss_kappa, read_judgments, run_import

BATCH = "b-0001"


def row(pid: str, ids: list[str], **context) -> dict:
    """A batch row as `label export` writes it, the candidates shown in the order of ``ids``."""
    return {
        "batch_id": BATCH,
        "prompt_id": pid,
        "user_id": f"user-{pid}",
        "prompt": [{"role": "user", "content": f"recommend for {pid}"}],
        "history": [{"item_id": "i1", "title": "Alien", "year": 1979, "genres": [], "rating": None}],
        "candidates": [{"candidate_id": c, "text": f"1. {pid}-{c} (2000) — why"} for c in ids],
        **context,
    }


def judgment(labeler: str, pid: str, preferred: str, key: str | None = None, batch: str = BATCH) -> str:
    """One line of the judgment log, as the server's store appends it."""
    rec = {
        "batch_id": batch,
        "prompt_id": pid,
        "preferred": preferred,
        "idempotency_key": key or f"{labeler}-{pid}",
        "labeler": labeler,
        "judged_at": "2030-01-01T00:00:00Z",
    }
    return json.dumps(rec) + "\n"


def write_round(run, rows, judgments: str, provenance: list[dict] | None = None, round_no: int = 1):
    d = run / "labels" / f"round-{round_no:03d}"
    d.mkdir(parents=True)
    (d / "batch.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "judgments.jsonl").write_text(judgments)
    if provenance is not None:
        (d / "provenance.jsonl").write_text("\n".join(json.dumps(p) for p in provenance) + "\n\n")
    return d


CONTEXT = {"history_ids": ["i1"], "history_ratings": [4.0], "candidate_ids": ["i2", "i3"], "shown": None}


def test_read_judgments_keeps_complete_parseable_lines_and_changes_nothing(tmp_path):
    path = tmp_path / "judgments.jsonl"
    assert read_judgments(path) == ([], Counter())
    good = judgment("ann", "p1", "c1")
    content = (
        good
        + "\n"  # a blank line: skipped, not counted
        + "{not json\n"
        + json.dumps({"labeler": "ann", "prompt_id": "p1", "preferred": "c1"})  # no idempotency_key
        + "\n[1, 2]\n"  # not an object
        + judgment("bob", "p1", "tie")
        + good[:30]  # a crash mid-append: never acknowledged
    )
    path.write_text(content)
    records, counts = read_judgments(path)
    assert [(r["labeler"], r["preferred"]) for r in records] == [("ann", "c1"), ("bob", "tie")]
    assert counts == Counter({"unreadable_line": 3, "incomplete_last_line": 1})
    assert path.read_text() == content
    path.write_text(good + good)
    assert read_judgments(path) == ([json.loads(good)] * 2, Counter())


def test_fleiss_kappa_by_hand():
    A, B = "position-1", "position-2"
    # three prompts by three labelers: P_i = 1, 1/3, 1; P = 7/9; p_e = (5/9)^2 + (4/9)^2 = 41/81
    three = [Counter({A: 3}), Counter({A: 2, B: 1}), Counter({B: 3})]
    assert fleiss_kappa(three) == pytest.approx((7 / 9 - 41 / 81) / (1 - 41 / 81))  # 0.55
    # varying numbers of labelers; a prompt with one labeler says nothing about agreement
    varying = [*three, Counter({A: 1, B: 1}), Counter({A: 1})]  # P_i = 1, 1/3, 1, 0; totals A 6, B 5 of 11
    assert fleiss_kappa(varying) == pytest.approx((7 / 12 - 61 / 121) / (1 - 61 / 121))
    assert fleiss_kappa([Counter({A: 2}), Counter({A: 3})]) is None  # one answer only: chance agreement is 1
    assert fleiss_kappa([Counter({A: 1}), Counter({"tie": 1})]) is None and fleiss_kappa([]) is None


@pytest.fixture
def new_york_time():
    """Local time five hours off UTC while the test runs."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TZ", "EST+5")
    time.tzset()
    yield
    mp.undo()
    time.tzset()


def test_import_a_hand_written_round(tmp_path, capsys, new_york_time):
    """Every rule at once: p1 (three lists) judged 2:1 with one list nobody picked, p2 (its lists shown in the
    order c2, c1) judged against a tie, p3 judged both bad by one labeler, p4 not judged; repeated lines, keys
    and prompts, judgments of another batch, an unknown prompt or an unknown candidate, an unreadable line and
    a torn last line."""
    run = tmp_path / "run"
    rows = [
        row("p1", ["c1", "c2", "c3"], **CONTEXT),
        row("p2", ["c2", "c1"]),
        row("p3", ["c1", "c2"], **CONTEXT),
        row("p4", ["c1", "c2"], **CONTEXT),
    ]
    provenance = [
        {"prompt_id": "p1", "candidates": {"c1": {"stage": "sft"}, "c2": {"stage": "ppo"}, "c3": {"stage": "base"}}},
        {"prompt_id": "p2", "candidates": {"c1": {"stage": "ppo"}, "c2": {"stage": "sft"}}},
    ]  # p3 and p4: none
    log = (
        judgment("dan", "p4", "c9")  # no such candidate
        + judgment("ann", "p1", "c1")
        + judgment("bob", "p1", "c1")
        + judgment("ann", "p1", "c1")  # the same line again
        + judgment("ann", "p1", "c3", key="second-try")  # p1 again: the first judgment stands
        + judgment("cat", "p1", "c2")
        + judgment("ann", "p2", "c2")
        + judgment("bob", "p2", "tie")
        + judgment("bob", "p3", "c2", key="bob-p1")  # a key bob used already
        + judgment("ann", "p3", "both_bad")
        + judgment("dan", "p3", "c1", batch="b-0000")  # another batch
        + judgment("dan", "p9", "c1")  # no such prompt
        + judgment("eve", "p4", "c3")  # p4 has no c3
        + "{oops\n"
        + judgment("eve", "p4", "c1")[:40]
    )
    d = write_round(run, rows, log, provenance)
    before = time.time()
    summary = run_import(None, run, 1)
    text = (d / "summary.json").read_text()
    assert json.loads(text) == summary and text.startswith('{\n  "round": 1,\n  "batch_id": ')  # for people to read
    imported = calendar.timegm(time.strptime(summary.pop("imported"), "%Y-%m-%dT%H:%M:%SZ"))
    assert before - 2 <= imported <= time.time() + 1  # UTC, as its Z says
    # agreement: p1 ann=bob, ann/cat, bob/cat (1 of 3), p2 ann/bob (0 of 1). Fleiss over shown positions:
    # p1 {1: 2, 2: 1} -> P = 1/3, p2 {1: 1, tie: 1} -> P = 0; totals 3, 1, 1 of 5 -> p_e = 11/25
    assert summary == {
        "round": 1,
        "batch_id": BATCH,
        "prompts": 4,
        "prompts_judged": 3,
        "judgments": {
            "read": 13,
            "used": 6,
            "duplicate": 3,
            "other_batch_or_unknown_prompt": 2,
            "unknown_candidate": 2,
            "unreadable_line": 1,
            "incomplete_last_line": 1,
        },
        "answers": {"candidate": 4, "tie": 1, "both_bad": 1},
        "pairs": 4,
        "labelers": {"ann": 3, "bob": 2, "cat": 1},
        "agreement": {
            "prompts_with_2plus": 2,
            "pairwise": 0.25,
            "fleiss_kappa": pytest.approx((1 / 6 - 11 / 25) / (1 - 11 / 25)),
        },
        "stage_wins": {"sft>ppo": 2, "sft>base": 1, "ppo>base": 1},
    }
    assert list(summary["labelers"]) == ["ann", "bob", "cat"]

    pairs = pq.read_table(d / "pairs.parquet").to_pylist()
    by_id = {r["prompt_id"]: r for r in rows}
    expected = {  # (prompt, chosen, rejected): votes, stages
        ("p1", "c1", "c2"): ({"c1": 2, "c2": 1}, "sft", "ppo"),
        ("p1", "c1", "c3"): ({"c1": 2, "c3": 0}, "sft", "base"),
        ("p1", "c2", "c3"): ({"c2": 1, "c3": 0}, "ppo", "base"),
        ("p2", "c2", "c1"): ({"c2": 1, "c1": 0}, "sft", "ppo"),
    }
    got = {}
    for pair in pairs:
        info = json.loads(pair["provenance"])
        key = (info["prompt_id"], info["chosen"], info["rejected"])
        got[key] = (info["votes"], info["chosen_stage"], info["rejected_stage"])
        r = by_id[key[0]]
        assert info["batch_id"] == BATCH
        assert info["labelers"] == (["ann", "bob", "cat"] if key[0] == "p1" else ["ann", "bob"])
        text = {c["candidate_id"]: c["text"] for c in r["candidates"]}
        assert pair["prompt"] == r["prompt"] and pair["user_id"] == r["user_id"]
        assert pair["chosen"] == [{"role": "assistant", "content": text[key[1]]}]
        assert pair["rejected"] == [{"role": "assistant", "content": text[key[2]]}]
        assert pair["source"] == "labels:round-001"
        assert pair["provenance"] == json.dumps(info, sort_keys=True)  # canonical, as the data stage writes it
        # the prompt's context for the reward terms, where the batch row has it (p2's has none)
        assert {f: pair[f] for f in CONTEXT} == ({f: None for f in CONTEXT} if key[0] == "p2" else CONTEXT)
    assert got == expected

    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"label import: 6 judgments (3 duplicates dropped) from 3 labelers -> 4 pairs in {d / 'pairs.parquet'} "
        "(source labels:round-001)",
        "label import: stage wins {'sft>ppo': 2, 'sft>base': 1, 'ppo>base': 1}",
    ]


def test_import_with_one_labeler_per_prompt(tmp_path, capsys):
    """One labeler per prompt: no agreement figures. Picking one of three lists orders it above each of the other
    two and says nothing about those two. A stage win needs the stages of both lists (p1's c1 has none). An even
    split between two labelers gives no pair. Round 12 is named as such."""
    run = tmp_path / "run"
    rows = [row("p1", ["c1", "c2"]), row("p2", ["c1", "c2", "c3"])]
    provenance = [{"prompt_id": "p1", "candidates": {"c2": {"stage": "sft"}}}]
    d = write_round(run, rows, judgment("ann", "p1", "c2") + judgment("bob", "p2", "c3"), provenance, round_no=12)
    summary = run_import(None, run, 12)
    assert summary["pairs"] == 3 and summary["stage_wins"] == {}
    assert summary["agreement"] == {"prompts_with_2plus": 0, "pairwise": None, "fleiss_kappa": None}
    assert summary["judgments"] == {"read": 2, "used": 2} and summary["answers"] == {"candidate": 2}
    pairs = pq.read_table(d / "pairs.parquet").to_pylist()
    info = [json.loads(p["provenance"]) for p in pairs]
    assert sorted((i["prompt_id"], i["chosen"], i["rejected"]) for i in info) == [
        ("p1", "c2", "c1"),
        ("p2", "c3", "c1"),
        ("p2", "c3", "c2"),
    ]
    assert [(i["chosen_stage"], i["rejected_stage"]) for i in info if i["prompt_id"] == "p1"] == [("sft", None)]
    assert {p["source"] for p in pairs} == {"labels:round-012"}
    assert capsys.readouterr().out.count("\n") == 1  # no stage wins line

    split = tmp_path / "split"
    d = write_round(split, rows, judgment("ann", "p1", "c1") + judgment("bob", "p1", "c2"))
    summary = run_import(None, split, 1)
    assert summary["pairs"] == 0 and summary["agreement"]["pairwise"] == 0.0
    assert summary["agreement"]["fleiss_kappa"] == pytest.approx(-1.0)  # P = 0, p_e = 1/2
    assert pq.read_table(d / "pairs.parquet").num_rows == 0


def test_import_of_an_empty_log(tmp_path, capsys):
    run = tmp_path / "run"
    d = write_round(run, [row("p1", ["c1", "c2"])], "")
    summary = run_import(None, run, 1)
    assert (summary["prompts"], summary["prompts_judged"], summary["pairs"]) == (1, 0, 0)
    assert summary["judgments"] == {"read": 0, "used": 0} and summary["labelers"] == {}
    assert pq.read_table(d / "pairs.parquet").num_rows == 0
    assert re.fullmatch(
        r"label import: 0 judgments \(0 duplicates dropped\) from 0 labelers -> 0 pairs in .*\n",
        capsys.readouterr().out,
    )
