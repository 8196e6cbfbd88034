"""ui/ratings.py against independent computations: the Bradley-Terry ratings against plain
gradient ascent on the per-vote log-likelihood, the pair intervals against the bootstrap written
out here and against the binomial's spread, and the edge cases (no votes, one pair, a model that
always wins)."""

import math

import numpy as np
import pytest

from ui import ratings


def vote(x: str, y: str, choice: str) -> dict:
    return {"model_a": x, "revision_a": f"sha-{x}", "repo_a": f"org/{x}", "model_b": y, "revision_b": f"sha-{y}",
            "repo_b": f"org/{y}", "choice": choice}


# A fixed table: four models, every one both wins and loses, ties and 'both bad' included, both sides used.
TABLE = ([vote("base", "v1", "B")] * 14 + [vote("v1", "base", "B")] * 6 + [vote("base", "v1", "tie")] * 4
         + [vote("v2", "v1", "A")] * 11 + [vote("v1", "v2", "A")] * 7 + [vote("v2", "v1", "both_bad")] * 3
         + [vote("v2", "base", "A")] * 9 + [vote("base", "v2", "A")] * 2 + [vote("other", "base", "B")] * 5
         + [vote("other", "v2", "A")] * 1 + [vote("v2", "other", "A")] * 6 + [vote("other", "v1", "tie")] * 2
         + [vote("v1", "v1", "A")] * 3)  # the same revision on both sides: not counted


def gradient_ascent(votes: list[dict], prior: float, steps: int = 40000) -> dict[str, float]:
    """The penalised maximum-likelihood ratings by plain gradient ascent, vote by vote: side A's score s
    adds s*log(p) + (1-s)*log(1-p), p = sigmoid(theta_A - theta_B); a tie scores 1/2."""
    score = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}
    counted = [v for v in votes if v["revision_a"] != v["revision_b"]]
    names = sorted({v[f"revision_{s}"] for v in counted for s in "ab"})
    a = np.array([names.index(v["revision_a"]) for v in counted])
    b = np.array([names.index(v["revision_b"]) for v in counted])
    s = np.array([score[v["choice"]] for v in counted])
    theta, rate = np.zeros(len(names)), 1 / len(counted)
    for _ in range(steps):
        residual = s - 1 / (1 + np.exp(theta[b] - theta[a]))
        theta += rate * (np.bincount(a, residual, len(names)) - np.bincount(b, residual, len(names)) - prior * theta)
    elo = 400 * theta / math.log(10)
    return dict(zip(names, elo - elo.mean() + 1000))


def test_bradley_terry_matches_a_direct_maximum_likelihood_fit():
    ranking = ratings.bradley_terry(TABLE, resamples=200)
    expected = gradient_ascent(TABLE, ratings.PRIOR)
    assert {r["revision"]: r["rating"] for r in ranking} == pytest.approx(expected, abs=0.01)  # rating points
    assert [r["revision"] for r in ranking] == sorted(expected, key=expected.get, reverse=True) and len(ranking) == 4
    assert np.mean([r["rating"] for r in ranking]) == pytest.approx(1000)
    for r in ranking:
        assert r["low"] <= r["rating"] <= r["high"] and r["high"] - r["low"] > 20, r
    assert {r["revision"]: r["votes"] for r in ranking}["sha-v1"] == 24 + 21 + 2


def test_the_prior_is_tiny_where_every_model_wins_and_loses():
    loose = {r["revision"]: r["rating"] for r in ratings.bradley_terry(TABLE, resamples=1, prior=1e-8)}
    fitted = {r["revision"]: r["rating"] for r in ratings.bradley_terry(TABLE, resamples=1)}
    assert fitted == pytest.approx(loose, abs=2)


def test_the_same_seed_gives_the_same_intervals_and_another_seed_others():
    first, again = ratings.bradley_terry(TABLE, resamples=100, seed=7), ratings.bradley_terry(TABLE, resamples=100, seed=7)
    assert first == again
    assert ratings.bradley_terry(TABLE, resamples=100, seed=8) != first


def test_pair_counts_win_rates_and_orientation():
    rows = {(r["model_x"], r["model_y"]): r for r in ratings.pairs(TABLE, resamples=100)}
    assert set(rows) == {("v1", "base"), ("v2", "v1"), ("v2", "base"), ("v2", "other"), ("v1", "other"),
                         ("other", "base")}
    v1 = rows[("v1", "base")]  # the later name is X
    assert (v1["votes"], v1["wins"], v1["losses"], v1["ties"], v1["both_bad"]) == (24, 14, 6, 4, 0)
    assert v1["win_rate"] == pytest.approx((14 + 4 / 2) / 24) and v1["revision_x"] == "sha-v1"
    v2 = rows[("v2", "v1")]
    assert (v2["votes"], v2["wins"], v2["losses"], v2["ties"], v2["both_bad"]) == (21, 11, 7, 0, 3)
    assert v2["win_rate"] == pytest.approx((11 + 3 / 2) / 21)  # 'both bad' counts as a tie


def test_pair_interval_is_the_percentile_bootstrap_with_the_documented_draws():
    rows = ratings.pairs(TABLE, resamples=500, seed=3)
    [row] = [r for r in rows if (r["model_x"], r["model_y"]) == ("v2", "v1")]
    # v2's scores against v1, in the order given: 11 wins, 7 losses, 3 'both bad'.
    s = np.array([1.0] * 11 + [0.0] * 7 + [0.5] * 3)
    rng = np.random.default_rng(3)
    rates = [s[rng.integers(0, len(s), size=len(s))].mean() for _ in range(500)]
    assert (row["low"], row["high"]) == pytest.approx((np.percentile(rates, 2.5), np.percentile(rates, 97.5)))


def test_pair_interval_has_the_binomial_width_and_the_ranking_interval_follows_it():
    n, wins = 400, 300
    table = [vote("x", "w", "A")] * wins + [vote("w", "x", "A")] * (n - wins)  # x, the later name, is X
    [row] = ratings.pairs(table)
    p = wins / n
    half = 1.96 * math.sqrt(p * (1 - p) / n)  # the normal approximation of the binomial's 95% interval
    assert row["low"] < row["win_rate"] == p < row["high"]
    assert row["high"] - row["low"] == pytest.approx(2 * half, abs=0.01)
    assert (row["win_rate"] - row["low"]) == pytest.approx(half, abs=0.01)
    # Two models: each resample's rating of x is 1000 + 200*log10(q/(1-q)) of its win rate q, and the
    # ranking draws the same resamples (the same votes in the same order), so its interval is the image
    # of the pair's (up to the prior's pull and the percentile's interpolation).
    ranking = {r["model"]: r for r in ratings.bradley_terry(table)}
    elo = lambda q: 1000 + 200 * math.log10(q / (1 - q))  # noqa: E731
    assert ranking["x"]["rating"] == pytest.approx(elo(p), abs=1)
    assert (ranking["x"]["low"], ranking["x"]["high"]) == pytest.approx((elo(row["low"]), elo(row["high"])), abs=2)
    assert ranking["w"]["rating"] == pytest.approx(2000 - ranking["x"]["rating"])


def test_no_votes_and_only_self_comparisons_rate_nothing():
    assert ratings.pairs([]) == [] and ratings.bradley_terry([]) == []
    same = [vote("x", "x", "A")] * 3
    assert ratings.pairs(same) == [] and ratings.bradley_terry(same) == []


def test_a_single_pair():
    table = [vote("x", "y", "A"), vote("x", "y", "B"), vote("y", "x", "A"), vote("x", "y", "tie")]
    [row] = ratings.pairs(table)
    assert (row["model_x"], row["wins"], row["losses"], row["ties"], row["win_rate"]) == ("y", 2, 1, 1, 0.625)
    ranking = ratings.bradley_terry(table)
    assert [r["model"] for r in ranking] == ["y", "x"]
    assert ranking[0]["rating"] == pytest.approx(1000 + 200 * math.log10(0.625 / 0.375), abs=1)


def test_a_model_that_always_wins_has_a_finite_rating_from_the_prior():
    table = [vote("champion", "base", "A")] * 10 + [vote("base", "champion", "B")] * 10
    [row] = ratings.pairs(table)
    assert (row["model_x"], row["win_rate"], row["low"], row["high"]) == ("champion", 1.0, 1.0, 1.0)
    ranking = ratings.bradley_terry(table)
    assert ranking[0]["model"] == "champion" and math.isfinite(ranking[0]["rating"]) and ranking[0]["rating"] > 1300
    assert ranking[0]["rating"] == pytest.approx(gradient_ascent(table, ratings.PRIOR, steps=200000)["sha-champion"],
                                                 abs=0.5)
    # every resample is the same 20 wins: the interval is the point
    assert ranking[0]["low"] == pytest.approx(ranking[0]["rating"]) == pytest.approx(ranking[0]["high"])
    with pytest.raises(ValueError, match="prior 0 must be positive"):
        ratings.bradley_terry(table, prior=0)


def test_two_names_served_from_one_commit_are_one_model():
    table = [vote("x", "y", "A"), {**vote("x", "y", "A"), "model_a": "x@v1"}]
    assert [(r["model"], r["votes"]) for r in ratings.bradley_terry(table)] == [("x@v1", 2), ("y", 2)]
