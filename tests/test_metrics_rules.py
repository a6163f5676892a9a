import math

import pytest

from reward_models.terms import DEFAULT_WEIGHTS, PromptContext, RewardEnv, rule_values
from reward_models.terms.rules import explanation_tied, rating_claims
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
