import math
from pathlib import Path

import numpy as np
import pytest

from reward_models.terms import DEFAULT_WEIGHTS, TERMS, PromptContext, RewardEnv, rule_values
from reward_models.terms.rules import explanation_tied, rating_claims, shown_pairs
from rlhf import metrics as M
from rlhf.catalog import Catalog
from rlhf.listing import parse_and_ground


def rule_terms(entries, k, history, catalog, candidate_ids=None, shown=None) -> dict:
    """Every rule term of one listing, as the composite computes them."""
    return rule_values(entries, PromptContext(history, candidate_ids or [], "u1", shown), RewardEnv(catalog, k))


def weighted_sum(terms: dict, weights: dict) -> float:
    return sum(weights[name] * value for name, value in terms.items())


def test_accuracy_metrics_by_hand():
    rel = {"b"}
    assert M.hit_rate(["a", "b", "c"], rel, 2) == 1.0 and M.hit_rate(["a", "b", "c"], rel, 1) == 0.0
    assert M.ndcg(["a", "b", "c"], rel, 3) == pytest.approx(1 / math.log2(3))
    assert M.ndcg(["b"], rel, 3) == 1.0
    assert M.recall(["b", "x"], {"b", "c"}, 2) == 0.5
    # duplicates count once: the second "b" earns nothing
    assert M.ndcg(["a", "a", "b"], {"a", "b"}, 3) == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))
    assert M.recall(["b", "b"], {"b", "c"}, 2) == 0.5
    # empty lists and unknown entries
    for f in (M.hit_rate, M.ndcg, M.recall):
        assert f([], rel, 5) == 0.0 and f([None, None], rel, 5) == 0.0
    assert M.ndcg(["b"], set(), 3) == 0.0


def test_paired_difference_by_hand():
    d = M.paired_difference([3.0, 5.0, 4.0, None], [1.0, 2.0, 4.0, 9.0])  # diffs 2, 3, 0 (the None pair is left out)
    assert d["n"] == 3 and d["delta"] == pytest.approx(5 / 3)
    assert d["se"] == pytest.approx(((((2 - 5 / 3) ** 2 + (3 - 5 / 3) ** 2 + (5 / 3) ** 2) / 2) / 3) ** 0.5)
    assert M.paired_difference([1.0], [0.0]) is None


def test_pearson_by_hand():
    assert M.pearson([1, 2, 3, None], [2, 4, 6, 0]) == pytest.approx(1.0)  # the None pair is left out
    assert M.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = (0, 1, 2, 3), y = (1, 0, 3, 2): centred (-1.5, -.5, .5, 1.5) and (-.5, -1.5, 1.5, .5) -> 3 / 5
    assert M.pearson([0, 1, 2, 3], [1, 0, 3, 2]) == pytest.approx(0.6)
    assert M.pearson([1, 1, 1], [1, 2, 3]) is None and M.pearson([1, 2], [1, 2]) is None


def test_reward_vs_truth_by_hand():
    """Eval's correlation of the composite reward, its learned part, its rule part and each term with true utility:
    every LLM listing with composite scores and a true utility, stages pooled, rules = reward - w * learned."""
    from reward_models.composite import Scored
    from rlhf.evaluate import _reward_vs_truth

    class Weights:  # what _reward_vs_truth reads of the composite: the learned term's weight, via rule_part
        weights = {"learned": 0.5}

        def rule_part(self, scored):
            return [t - 0.5 * s for t, s in zip(scored.total, scored.terms["learned"])]

    per_user = {
        "base": {"true_utility": [0.9, 0.1]},  # no composite scores for this stage: left out
        "sft": {"true_utility": [0.0, 0.5, 1.0], "reward": [1.0, 2.0, 4.0]},
        "ppo": {"true_utility": [0.2, 0.4], "reward": [3.0, 0.0]},
    }
    scored = {
        "sft": Scored([1.0, 2.0, 4.0], {"learned": [0.0, 2.0, 2.0], "has_k": [1.0, 1.0, 0.0]}),
        "ppo": Scored([3.0, 0.0], {"learned": [4.0, -2.0], "has_k": [1.0, 0.5]}),
    }
    util, reward, score = [0.0, 0.5, 1.0, 0.2, 0.4], [1.0, 2.0, 4.0, 3.0, 0.0], [0.0, 2.0, 2.0, 4.0, -2.0]
    rules = [1.0, 1.0, 3.0, 1.0, 1.0]  # reward - 0.5 * learned
    got = _reward_vs_truth(per_user, scored, Weights())
    assert got == {
        "reward": pytest.approx(M.pearson(reward, util)),
        "learned": pytest.approx(M.pearson(score, util)),
        "rules": pytest.approx(M.pearson(rules, util)),
        "terms": {
            "learned": pytest.approx(M.pearson(score, util)),
            "has_k": pytest.approx(M.pearson([1.0, 1.0, 0.0, 1.0, 0.5], util)),
        },
        "n": 5,
        "by_stage": {  # each stage on its own listings; two listings are too few for a correlation
            "sft": {
                "reward": pytest.approx(M.pearson([1.0, 2.0, 4.0], [0.0, 0.5, 1.0])),
                "learned": pytest.approx(M.pearson([0.0, 2.0, 2.0], [0.0, 0.5, 1.0])),
                "n": 3,
            },
            "ppo": {"reward": None, "learned": None, "n": 2},
        },
    }
    assert got["rules"] == pytest.approx(1.16 / (3.2 * 0.568) ** 0.5)  # centred sums by hand: cov, var, var
    no_sim = {"sft": {"reward": [1.0]}}
    assert _reward_vs_truth(no_sim, {"sft": Scored([1.0], {"learned": [1.0]})}, Weights()) is None  # no simulator


def test_beyond_accuracy_by_hand():
    assert M.duplicate_rate(["a", "a", None, "b"]) == 0.25
    assert M.novelty(["a"], {"a": 3}, 7) == pytest.approx(-math.log2(4 / 8))
    feats = {"a": {"x"}, "b": {"x"}, "c": {"y"}}
    assert M.intra_list_diversity(["a", "b"], feats) == 0.0
    assert M.intra_list_diversity(["a", "c"], feats) == 1.0
    assert M.intra_list_diversity(["a", "b", "c"], feats) == pytest.approx(2 / 3)
    assert M.intra_list_diversity(["a"], feats) == 0.0


@pytest.fixture(scope="module")
def catalog():
    return Catalog.builtin()


def _ids(catalog, *titles):
    return [catalog.ground(t).item_id for t in titles]


def test_rule_terms_on_crafted_listings(catalog):
    history = _ids(catalog, "Alien", "The Thing")
    good = parse_and_ground(
        "1. Aliens (1986) — sci-fi horror like Alien\n2. Predator (1987) — like The Thing\n"
        "3. Halloween (1978) — horror like Alien",
        catalog,
    )
    t = rule_terms(good, 3, history, catalog)
    assert t == {
        "parses": 1.0,
        "has_k": 1.0,
        "in_catalog": 1.0,
        "no_duplicates": 0.0,
        "not_in_history": 0.0,
        "in_candidates": 0.0,
        "explained": 1.0,
        "misquoted": 0.0,
    }
    bad = parse_and_ground(
        "1. Alien (1979) — great\n2. Aliens (1986) — \n3. Aliens (1986) — again\n4. Blorp Zorp (2030) — horror", catalog
    )
    t = rule_terms(bad, 3, history, catalog)
    assert t["has_k"] == pytest.approx(2 / 3)
    assert t["in_catalog"] == 0.5  # Alien and Aliens: a repeat earns no catalog credit
    assert t["no_duplicates"] == -0.25 and t["not_in_history"] == -0.25
    assert t["explained"] == 0.25  # only "horror" ties to the history's genres
    assert rule_terms([], 3, history, catalog)["parses"] == 0.0
    # the reward hack PPO found: K copies of one catalog title must score below K distinct titles
    same = parse_and_ground(
        "1. Aliens (1986) — sci-fi horror like Alien\n2. Aliens (1986) — sci-fi horror like Alien\n"
        "3. Aliens (1986) — sci-fi horror like Alien",
        catalog,
    )
    made_up = parse_and_ground(
        "1. Blorp Zorp (2030) — horror like Alien\n2. Blorp Zorp (2030) — horror like Alien\n"
        "3. Aliens (1986) — sci-fi horror like Alien",
        catalog,
    )
    assert rule_terms(made_up, 3, history, catalog)["no_duplicates"] == pytest.approx(-1 / 3)  # repeats off-catalog too
    w = DEFAULT_WEIGHTS
    assert (
        weighted_sum(rule_terms(good, 3, history, catalog), w) - weighted_sum(rule_terms(same, 3, history, catalog), w)
        >= 1.0
    )
    cands = _ids(catalog, "Aliens", "Predator")
    t = rule_terms(good, 3, history, catalog, candidate_ids=cands)
    assert t["in_candidates"] == pytest.approx(-1 / 3)
    assert weighted_sum(rule_terms(good, 3, history, catalog), DEFAULT_WEIGHTS) > weighted_sum(
        rule_terms(bad, 3, history, catalog), DEFAULT_WEIGHTS
    )


def test_sft_reasons_quote_half_star_ratings_as_the_prompt_shows_them(catalog):
    """The data stage's reasons (rlhf/explain.py) once cut 3.5 to "3/5" and 0.5 to "0/5": SFT learned to misquote.
    Every reason explain writes for a rated history passes the claim check against that history."""
    from rlhf.explain import explain, stars
    from rlhf.prompts import PromptBuilder

    heat, fargo = _ids(catalog, "Heat", "Fargo")
    for rating in (0.5, 3.5, 4.0, 5.0):
        reason = explain(fargo, [(heat, rating)], catalog)
        assert f"which you rated {stars(rating)}/5" in reason
        assert rating_claims(reason, [(heat, rating)], catalog) == [True], reason
    assert (stars(0.5), stars(3.5), stars(4.0)) == ("0.5", "3.5", "4")
    # the prompt shows the same figure the reason quotes
    messages, _ = PromptBuilder(catalog).build([(heat, 3.5)], None)
    assert "3.5" in messages[-1]["content"]


def test_explanation_tie(catalog):
    h = _ids(catalog, "Heat")
    assert explanation_tied("a crime epic like Heat", h, catalog)
    assert explanation_tied("more crime", h, catalog)
    assert not explanation_tied("you will love it", h, catalog)
    assert not explanation_tied("", h, catalog)


def test_rating_claims_checked_against_the_shown_history(catalog):
    heat, alien = _ids(catalog, "Heat") + _ids(catalog, "Alien")
    shown = [(heat, 5.0), (alien, None)]
    assert rating_claims("crime like Heat, which you rated 5/5", shown, catalog) == [True]
    assert rating_claims("crime like Heat, which you rated 3/5", shown, catalog) == [False]  # wrong rating
    assert rating_claims("sci-fi like Alien, which you rated 4/5", shown, catalog) == [False]  # never rated
    assert rating_claims("like Vertigo, which you rated 5/5", shown, catalog) == [False]  # not in history
    assert rating_claims("action like Heat (1995), which you rated 5/5 and Alien", shown, catalog) == [True]
    assert rating_claims("a crime epic like Heat", shown, catalog) == []  # no claim made
    assert rating_claims("also by Michael Mann, like Heat, which you rated 5/5", shown, catalog) == [True]
    assert rating_claims("heists like Ocean's, like Heat, which you rated 5/5", shown, catalog) == [True]

    # half stars (MovieLens): the reason must quote the rating the prompt showed, not a rounded one
    half = [(heat, 3.5), (alien, 4.0)]
    assert rating_claims("crime like Heat, which you rated 3.5/5", half, catalog) == [True]
    assert rating_claims("crime like Heat, which you rated 3/5", half, catalog) == [False]
    assert rating_claims("crime like Heat, which you rated 4/5", half, catalog) == [False]
    assert rating_claims("sci-fi like Alien, which you rated 4/5", half, catalog) == [True]

    # as a reward term: one of three reasons misquotes, the others quote correctly or quote nothing
    entries = parse_and_ground(
        "1. Fargo (1996) — crime like Heat, which you rated 5/5\n"
        "2. Zodiac (2007) — crime like Heat, which you rated 2/5\n"
        "3. Aliens (1986) — sci-fi like Alien",
        catalog,
    )
    history = [heat, alien]
    assert rule_terms(entries, 3, history, catalog, shown=shown)["misquoted"] == pytest.approx(-1 / 3)
    assert rule_terms(entries, 3, history, catalog)["misquoted"] == 0.0  # nothing shown: not checked
    assert DEFAULT_WEIGHTS["misquoted"] == 0.0  # off unless a recipe sets it


def test_bradley_terry_weights_follow_the_labels():
    """Labels decided by term a (and a little by b): a earns the most weight, a term unrelated to the labels
    about none, and a term that points against them none (w >= 0)."""
    import numpy as np

    from reward_models.weights import fit_bradley_terry, pairwise_accuracy

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 4))  # term differences chosen - rejected, before the labels orient them
    logits = 3.0 * x[:, 0] + 1.0 * x[:, 1]
    prefer_first = rng.random(400) < 1 / (1 + np.exp(-logits))
    x = np.where(prefer_first[:, None], x, -x)  # each row as (chosen - rejected)
    x[:, 3] = -np.abs(x[:, 3])  # a term always lower on the chosen side
    w = fit_bradley_terry(x, l2=0.1)
    assert w[0] > w[1] > 0.3 and w[2] < 0.15 and w[3] == 0.0
    assert pairwise_accuracy(x, w) > 0.8 and pairwise_accuracy(x[:, [2]], np.ones(1)) < 0.6


def test_an_empty_listing_scores_zero_on_every_rule(catalog):
    """The rules' promise (reward_models/terms/rules.py): no entries, no reward and no penalty, whatever the
    prompt showed (here a history, candidates and ratings) and with no prompt context at all."""
    heat = _ids(catalog, "Heat")
    rules = [name for name, spec in TERMS.items() if spec.rule is not None]
    for ctx in (PromptContext(heat, heat, "u1", [(heat[0], 5.0)]), None):
        assert rule_values([], ctx, RewardEnv(catalog, 3)) == dict.fromkeys(rules, 0.0)


def test_rules_without_a_prompt_context(catalog):
    """Without a context (no history, candidates or shown ratings), the rules that need one neither reward nor
    penalise; the others score the listing as usual."""
    entries = parse_and_ground("1. Heat (1995) — crime like Heat, which you rated 5/5\n2. Blorp Zorp — crime", catalog)
    assert rule_values(entries, None, RewardEnv(catalog, 2)) == {
        "parses": 1.0,
        "has_k": 1.0,
        "in_catalog": 0.5,
        "no_duplicates": 0.0,
        "not_in_history": 0.0,
        "in_candidates": 0.0,
        "explained": 0.0,
        "misquoted": 0.0,
    }


def test_explanation_tie_skips_history_items_outside_the_catalog(catalog):
    heat, alien = _ids(catalog, "Heat", "Alien")
    assert explanation_tied("an epic like Heat", ["not-in-catalog", heat], catalog)
    assert explanation_tied("more horror", ["not-in-catalog", heat, "gone", alien], catalog)  # Alien's genre
    assert not explanation_tied("more horror", ["not-in-catalog"], catalog)


def test_duplicates_are_the_same_item_or_the_same_made_up_title():
    """Two remakes sharing a title are two items; two different made-up titles are no repeat; the same made-up
    title written twice (any case) is."""
    cat = Catalog.from_records(
        [
            {"item_id": "a", "title": "Dune", "attributes": {"year": 1984}},
            {"item_id": "b", "title": "Dune", "attributes": {"year": 2021}},
        ]
    )
    env, ctx = RewardEnv(cat, 2), PromptContext([])
    remakes = parse_and_ground("1. Dune (1984) — x\n2. Dune (2021) — y", cat)
    assert [e.item_id for e in remakes] == ["a", "b"]
    assert rule_values(remakes, ctx, env)["no_duplicates"] == 0.0
    assert rule_values(parse_and_ground("1. Blorp — x\n2. Zorp — y", cat), ctx, env)["no_duplicates"] == 0.0
    assert rule_values(parse_and_ground("1. Blorp — x\n2. BLORP — y", cat), ctx, env)["no_duplicates"] == -0.5


def test_a_rule_as_a_term_of_the_contract(catalog):
    """TermSpec.build binds a rule to the run (catalog, K): called with a batch, it parses and grounds each
    completion and scores it against that completion's own prompt context."""
    heat, alien = _ids(catalog, "Heat", "Alien")
    env = RewardEnv(catalog, 2)
    term = TERMS["not_in_history"].build(env)
    completions = ["1. Heat (1995) — x\n2. Alien (1979) — y", "1. Heat (1995) — x\n2. Alien (1979) — y", "no list"]
    contexts = [PromptContext([heat]), PromptContext([heat, alien]), PromptContext([heat])]
    assert term([[{"role": "user", "content": "p"}]] * 3, completions, contexts) == [-0.5, -1.0, 0.0]
    assert TERMS["has_k"].build(RewardEnv(catalog, 4))([[]] * 2, completions[:2], contexts[:2]) == [0.5, 0.5]


def test_shown_pairs_of_a_prompt_row():
    row = {"shown": [{"item_id": "a", "rating": 5.0, "title": "A"}, {"item_id": "b", "rating": None}]}
    assert shown_pairs(row) == [("a", 5.0), ("b", None)]
    assert shown_pairs({"shown": []}) == []  # shown, none rated: claims are checked (all false)
    assert shown_pairs({"shown": None}) is None and shown_pairs({"history_ids": ["a"]}) is None
    assert PromptContext.from_row({"history_ids": ["a"], **row}).shown == [("a", 5.0), ("b", None)]


def test_metrics_of_empty_and_unscoreable_lists():
    """An empty list scores 0 everywhere (module docstring); with no held-out items there is nothing to recall."""
    assert M.recall(["a"], set(), 3) == 0.0
    assert M.duplicate_rate([]) == 0.0 and M.share([], {"a"}) == 0.0 and M.novelty([], {"a": 1}, 3) == 0.0
    assert M.novelty([None], {"a": 1}, 3) == 0.0  # only titles outside the catalog
    assert M.mean([]) is None and M.mean([None, None]) is None


def test_share_novelty_and_mean_by_hand():
    assert M.share(["a", "a", "a", None], {"a"}) == 0.75
    # an item no training user had: p = (0 + 1) / (7 + 1); the mean over items, titles outside the catalog left out
    assert M.novelty(["z"], {"a": 3}, 7) == pytest.approx(3.0)
    assert M.novelty(["a", None, "z"], {"a": 3}, 7) == pytest.approx((1.0 + 3.0) / 2)
    assert M.mean([1.0, None, 2.0]) == 1.5


def test_intra_list_diversity_with_partial_and_missing_attributes():
    feats = {"a": {"x", "y"}, "b": {"y", "z"}, "e": set()}
    assert M.intra_list_diversity(["a", "b"], feats) == pytest.approx(1 - 1 / 3)  # Jaccard |{y}| / |{x, y, z}|
    assert M.intra_list_diversity(["a", "unknown"], feats) == 1.0  # no attributes known: nothing shared
    assert M.intra_list_diversity(["e", "unknown"], feats) == 1.0  # two empty sets share nothing either
    assert M.intra_list_diversity(["a", "a", None, "b"], feats) == pytest.approx(2 / 3)  # repeats and None out


def test_paired_difference_from_two_pairs_and_pearson_at_unit_spread():
    d = M.paired_difference([1.0, 2.0], [0.0, 0.0])  # diffs 1, 2: mean 1.5, sample variance 0.5, se sqrt(0.5 / 2)
    assert d == {"delta": 1.5, "se": pytest.approx(0.5), "n": 2}
    assert M.pearson([0, 2, 0, 2], [0, 2, 0, 2]) == pytest.approx(1.0)  # a spread of exactly 1 is a spread


def test_describe_eval_lines():
    """The lines under the metrics table: one per stage of vs_sft with any difference, then the correlation
    with true utility, 'n/a' where a side was constant."""
    results = {
        "vs_sft": {
            "ppo": {"true_utility": {"delta": 0.1104, "se": 0.0191, "n": 80}, "ndcg@3": None},
            "base": {"true_utility": None},  # no difference measured: no line
            "grpo": {"ndcg@3": {"delta": -0.05, "se": 0.012, "n": 80}, "true_utility": {"delta": 0.0, "se": 0.0}},
        },
        "reward_vs_truth": {"reward": 0.5, "learned": None, "rules": -0.254, "n": 40},
    }
    assert M.describe_eval(results) == [
        "ppo − sft: true_utility +0.110 ± 0.019 (same users, mean ± standard error)",
        "grpo − sft: ndcg@3 -0.050 ± 0.012, true_utility +0.000 ± 0.000 (same users, mean ± standard error)",
        "correlation with true utility over 40 LLM listings: reward +0.50, learned n/a, rules -0.25",
    ]
    assert M.describe_eval({}) == [] and M.describe_eval({"vs_sft": {}, "reward_vs_truth": None}) == []


def _tiny_behaviour():
    """Four items; users who have a also have b, and those who have c also have d (item-kNN on that log)."""
    from reward_models.terms.behaviour import BehaviourModel

    log = [("u1", "a", 5.0), ("u1", "b", 5.0), ("u2", "a", 4.0), ("u2", "b", 4.0), ("u3", "c", 5.0), ("u3", "d", 5.0)]
    log += [("u4", "c", 4.0), ("u4", "d", 3.0), ("u5", "e", 4.0)]
    return BehaviourModel.fit("itemknn", ["a", "b", "c", "d", "e"], log)


def test_behaviour_term_by_hand():
    """Form percentile. A user who loved a: b is their best unseen item, then c and d (history weights: rating - 3);
    a made-up, a repeated and an already-seen item earn nothing; the best items first score above the worst first."""
    from reward_models.terms.behaviour import BehaviourModel, listing_value

    model = _tiny_behaviour()
    pct = model.percentiles(["a"], [5.0])
    assert pct[model.index["b"]] == 1.0 and np.isnan(pct[model.index["a"]])  # seen: no percentile
    ideal = 1 + 1 / math.log2(3)
    best = listing_value(model, ["b", "e"], ["a"], 2, ratings=[5.0], form="percentile")
    assert best == pytest.approx((1.0 + pct[model.index["e"]] / math.log2(3)) / ideal)
    worst = listing_value(model, ["e", "b"], ["a"], 2, ratings=[5.0], form="percentile")
    assert best > worst
    assert listing_value(model, [None, "b"], ["a"], 2, ratings=[5.0], form="percentile") == pytest.approx(
        1 / math.log2(3) / ideal
    )
    assert listing_value(model, ["b", "b"], ["a"], 2, ratings=[5.0], form="percentile") == pytest.approx(
        1 / ideal
    )  # a repeat: 0
    assert listing_value(model, ["a", "b"], ["a"], 2, ratings=[5.0], form="percentile") == pytest.approx(
        1 / math.log2(3) / ideal
    )
    # a 1/5 for a pushes its neighbour b below the others; unrated history counts as liked
    assert model.percentiles(["a"], [1.0])[model.index["b"]] == 0.0
    assert model.percentiles(["a"], None)[model.index["b"]] == 1.0
    # saved and loaded, the same ranking
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        again = BehaviourModel.load(model.save(Path(tmp) / "b.npz"))
    assert np.allclose(again.percentiles(["a"], [5.0]), pct, equal_nan=True)


def test_behaviour_term_score_form_by_hand():
    """Form score (the default): each item's score scaled over the user's unseen catalog (0 at its 10th percentile,
    1 at the best), DCG over the catalog's best K; a made-up, a repeated, a seen and an unoffered item earn nothing;
    the best first beats the worst first; candidates that miss the user's best cannot reach 1."""
    from reward_models.terms.behaviour import listing_value

    model = _tiny_behaviour()
    s = model.scores(["a"], [5.0]).astype(float)
    unseen = [model.index[i] for i in "bcde"]
    lo, hi = np.percentile(s[unseen], 10), s[unseen].max()
    v = {i: min(max((s[model.index[i]] - lo) / (hi - lo), 0.0), 1.0) for i in "bcde"}
    assert v["b"] == 1.0 and min(v.values()) == 0.0
    second = sorted(v.values())[-2]
    ideal = 1 + second / math.log2(3)
    d = 1 / math.log2(3)

    def value(items, **kw):
        return listing_value(model, items, ["a"], 2, ratings=[5.0], **kw)

    assert value(["b", "e"]) == pytest.approx((1 + v["e"] * d) / ideal)
    assert value(["b", "c"]) > value(["c", "b"])  # the user's best first
    assert value([None, "b"]) == pytest.approx(d / ideal)  # made up: nothing
    assert value(["b", "b"]) == pytest.approx(1 / ideal)  # a repeat: nothing
    assert value(["a", "b"]) == pytest.approx(d / ideal)  # already seen: nothing
    assert value(["b", "c"], candidates=["c", "d", "e"]) == pytest.approx(v["c"] * d / ideal)  # b not offered
    among = model.percentiles(["a"], [5.0], ["c", "d", "e"])
    best_offered = max("cde", key=lambda i: among[model.index[i]])  # the percentile form's first choice
    assert value([best_offered], candidates=["c", "d", "e"]) < 1.0  # the offer missed the user's best, b
    # the percentile form scores the same offer's best at the top: it cannot tell a poor offer from a good one
    assert (
        listing_value(model, [best_offered], ["a"], 1, ratings=[5.0], candidates=["c", "d", "e"], form="percentile")
        == 1.0
    )
    with pytest.raises(ValueError, match="use score or percentile"):
        value(["b"], form="rank")
    # a model with no preference (every unseen item scores alike) values each unseen item 1
    from reward_models.terms.behaviour import BehaviourModel

    flat = BehaviourModel("popularity", ["a", "b", "c"], None, np.ones(3))
    assert listing_value(flat, ["b", "c"], ["a"], 2) == pytest.approx(1.0)


def test_behaviour_term_among_candidates_spans_the_choice():
    """With a prompt's candidates the percentile is among them: the best of {c, d, e} scores 1 and the worst 0, as
    the whole catalog's ranking of the three would not (there they share the bottom of a 4-item ranking), and an item
    outside the candidates earns nothing."""
    from reward_models.terms.behaviour import listing_value

    model = _tiny_behaviour()
    whole = model.percentiles(["a"], [5.0])
    among = model.percentiles(["a"], [5.0], ["c", "d", "e"])
    ranked = sorted(["c", "d", "e"], key=lambda i: -whole[model.index[i]])
    assert [among[model.index[i]] for i in ranked] == [1.0, 0.5, 0.0]
    assert np.isnan(among[model.index["b"]]) and np.isnan(among[model.index["a"]])  # not offered; seen
    assert max(whole[model.index[i]] for i in ranked) < 1.0  # b, the catalog's best, is not among them
    ideal = 1 + 1 / math.log2(3)
    top = listing_value(model, ranked[:2], ["a"], 2, ratings=[5.0], candidates=["c", "d", "e"], form="percentile")
    assert top == pytest.approx((1.0 + 0.5 / math.log2(3)) / ideal)
    assert listing_value(
        model, ["b", ranked[0]], ["a"], 2, ratings=[5.0], candidates=["c", "d", "e"], form="percentile"
    ) == (pytest.approx(1.0 / math.log2(3) / ideal))


def test_next_item_term_by_hand(catalog):
    """On a training prompt, credit for listing what the user rated next, shaped by rank; none without a future."""
    from reward_models.terms import PromptContext, RewardEnv
    from reward_models.terms.next_item import score

    env = RewardEnv(catalog, 3)
    heat, fargo = _ids(catalog, "Heat") + _ids(catalog, "Fargo")
    future = PromptContext(history_ids=[], future_ids=[heat, fargo])
    first = "1. Heat (1995) — x\n2. Alien (1979) — x\n3. Fargo (1996) — x"
    last = "1. Alien (1979) — x\n2. Aliens (1986) — x\n3. Heat (1995) — x"
    made_up = "1. Blorp (2030) — x\n2. Blorp (2030) — x\n3. Zorp (2031) — x"
    got = score(env, [None] * 3, [first, last, made_up], [future] * 3)
    ideal = 1 + 1 / math.log2(3)
    assert got == pytest.approx([(1 + 1 / 2) / ideal, (1 / 2) / ideal, 0.0])
    assert score(env, [None], [first], [PromptContext(history_ids=[])]) == [0.0]  # a held-out user's prompt


def test_behaviour_term_with_the_genre_model(tmp_path):
    """The genre profile as the behaviour model: a comedy lover's comedy earns the top percentile and a horror film
    the bottom, saved and loaded it ranks the same, and a catalog without genres is refused by name."""
    from reward_models.terms.behaviour import BehaviourModel, listing_value

    genres = {"c1": ["comedy"], "c2": ["comedy"], "h1": ["horror"], "h2": ["horror"], "d1": ["drama"]}
    log = [(f"f{n}", i, r) for n in range(4) for i, r in (("c1", 5.0), ("c2", 4.0), ("h1", 1.0))]
    log += [(f"g{n}", i, r) for n in range(4) for i, r in (("h1", 5.0), ("h2", 4.0), ("c1", 2.0))]
    model = BehaviourModel.fit("genre", list(genres), log, genres)
    pct = model.percentiles(["c1", "h1"], [5.0, 1.0])
    assert pct[model.index["c2"]] == 1.0 and pct[model.index["h2"]] == 0.0
    for form in ("score", "percentile"):
        assert listing_value(model, ["c2", "h2"], ["c1", "h1"], 2, ratings=[5.0, 1.0], form=form) > listing_value(
            model, ["h2", "c2"], ["c1", "h1"], 2, ratings=[5.0, 1.0], form=form
        )
    again = BehaviourModel.load(model.save(tmp_path / "b.npz"))
    assert again.factors is not None and again.matrix is None
    assert np.allclose(again.percentiles(["c1", "h1"], [5.0, 1.0]), pct, equal_nan=True)
    with pytest.raises(ValueError, match="genres"):
        BehaviourModel.fit("genre", list(genres), log)
    with pytest.raises(ValueError, match="use genre, ease, itemknn or popularity"):
        BehaviourModel.fit("svd", list(genres), log)


def test_response_kl_sums_each_rows_own_response_tokens():
    """eval's KL to SFT reads log-probabilities of the response positions only: it must equal the sum, per row,
    of log p - log p_ref over that row's own response tokens taken from full-width log-softmaxes."""
    import torch

    from reward_models.encoding import pad_left, prompt_ids, response_ids
    from rlhf.evaluate import response_kl
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model

    path = resolve_model("tiny")
    tok = load_tokenizer(path)
    policy, reference = load_causal_lm(path, "float32"), load_causal_lm(path, "float32")
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [[{"role": "user", "content": "Recommend three films like Alien"}], [{"role": "user", "content": "x"}]]
    texts = ["1. Heat (1995) — a heist like Alien, which you rated 5/5", "1. Up"]  # responses of unequal length
    seqs = [prompt_ids(tok, p) + response_ids(tok, t) for p, t in zip(prompts, texts)]
    ids, mask = pad_left(seqs, tok.pad_token_id)

    def full(model):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)

    lp, lr = full(policy), full(reference)
    expected = np.mean(
        [
            float((lp[r, -len(response_ids(tok, t)) :] - lr[r, -len(response_ids(tok, t)) :]).sum())
            for r, t in enumerate(texts)
        ]
    )
    got = response_kl(policy, reference, tok, prompts, texts)
    assert abs(expected) > 1e-3 and got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert response_kl(reference, reference, tok, prompts, texts) == pytest.approx(0.0, abs=1e-6)


def test_behaviour_term_reads_ratings_unless_told_implicit():
    """reward.behaviour_ratings: a user who loved a and hated c. Read with ratings (the default, weights rating - 3)
    c's neighbour d is pushed below b; read as implicit feedback (every history item weighs 1, as the classic
    baselines score) b and d are alike. The term, built from the run's env, follows the reading."""
    from reward_models.terms import TERMS

    model = _tiny_behaviour()
    cat = Catalog.from_records([{"item_id": i, "title": f"Film {i.upper()}"} for i in "abcde"])
    ctx = PromptContext(["a", "c"], history_ratings=[5.0, 1.0])
    rated = model.scores(["a", "c"], [5.0, 1.0])
    implicit = model.scores(["a", "c"], None)
    b, d = model.index["b"], model.index["d"]
    assert rated[b] > rated[d] and implicit[b] == pytest.approx(implicit[d])

    def term_value(listing="1. Film D — x\n2. Film B — y", **reading):
        return TERMS["behaviour"].build(RewardEnv(cat, 2, behaviour=model, **reading))([[]], [listing], [ctx])[0]

    # with ratings, listing the disliked film's neighbour first costs
    assert term_value() < term_value("1. Film B — x\n2. Film D — y")
    assert term_value(behaviour_ratings=False) == pytest.approx(1.0)  # implicitly, b and d are both the best
    assert term_value() < term_value(behaviour_ratings=False)
