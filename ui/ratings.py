"""Win rates and a ranking from the blind votes: `loradock votes report`, and the screen's Votes tab.

    from ui import ratings, votes
    rows = votes.outcomes(path)
    ratings.pairs(rows)          # per pair of revisions: counts, win rate, bootstrap 95% interval
    ratings.bradley_terry(rows)  # every voted revision on one Elo-like scale, with 95% intervals

How votes count:
- A model is a revision (`revision_a` / `revision_b`: the commit sha, or the name of a model with
  none): two names served from one commit are one model. A vote with the same revision on both
  sides says nothing and is left out.
- A vote scores 1 for the side picked and 0 for the other; a tie, and 'both bad', score 1/2 each
  (as Chatbot Arena counts "both bad": neither answer was preferred).
- The win rate of X over Y is X's mean score over their votes: (wins + (ties + both bad) / 2) / votes.

Intervals are percentile bootstraps: `resamples` times, draw as many votes as there are, with
replacement, recompute, and take the 2.5th and 97.5th percentiles. The draws are fixed by `seed`:
`rng = numpy.random.default_rng(seed)`, then `rng.integers(0, n, size=n)` once per resample, in
order, indexing the votes in the order given (a pair's own votes, for its interval; all the
counted votes, for the ranking).

The ranking is a Bradley-Terry model, P(X beats Y) = 1 / (1 + 10 ** ((R_Y - R_X) / 400)), on the
scale Chatbot Arena reports: R = 400 * log10(strength), shifted so that the mean rating of the
ranked models is 1000. It maximises the log-likelihood of the scores (a tie is half a win each
way) minus `prior / 2 * sum(theta ** 2)`, theta the natural-log strengths: a normal prior of
variance 1 / prior (0.01: 10 nats, ~1,700 rating points). It changes next to nothing where every
model both wins and loses, and it keeps the estimate finite for a model that never loses (or
never wins), and defined for models no vote connects. Fitted by Newton's method with a
backtracking line search (the objective is strictly concave).
"""

import math
from dataclasses import dataclass

import numpy as np

RESAMPLES, SEED, PRIOR = 2000, 0, 0.01
SCORES = {"A": 1.0, "B": 0.0, "tie": 0.5, "both_bad": 0.5}  # side A's score
SCALE = 400 / math.log(10)  # rating points per nat of strength
CENTRE = 1000.0


@dataclass
class Model:
    revision: str
    name: str  # the name it was last served under
    repo: str


def comparisons(votes: list[dict]) -> tuple[list[Model], np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """(models, a, b, score, counted votes): counted vote k put model a[k] (side A) against model
    b[k] and scored `score[k]` for side A. Models are ordered: those not from the registry (a base
    model) first, then by name, then by revision."""
    counted = [v for v in votes if v["revision_a"] != v["revision_b"]]
    seen = {}
    for v in counted:
        for side in "ab":
            seen[v[f"revision_{side}"]] = Model(v[f"revision_{side}"], v[f"model_{side}"], v.get(f"repo_{side}") or "")
    models = sorted(seen.values(), key=lambda m: (bool(m.repo), m.name, m.revision))
    index = {m.revision: k for k, m in enumerate(models)}
    a = np.array([index[v["revision_a"]] for v in counted], dtype=int)
    b = np.array([index[v["revision_b"]] for v in counted], dtype=int)
    return models, a, b, np.array([SCORES[v["choice"]] for v in counted], dtype=float), counted


def percentile_interval(statistic, n: int, resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The 2.5th and 97.5th percentiles of `statistic(indices)` over the bootstrap resamples of n
    items (NaN, for a value a resample cannot give, is left out)."""
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, size=n)) for _ in range(resamples)], dtype=float)
    return np.nanpercentile(values, 2.5, axis=0), np.nanpercentile(values, 97.5, axis=0)


def pairs(votes: list[dict], resamples: int = RESAMPLES, seed: int = SEED) -> list[dict]:
    """One row per pair of revisions that met: X is the one from the registry, else the one with the
    later (name, revision), so an adapter comes before its base model and alice/reverse@v2 before
    alice/reverse@v1.

    Returns:
        rows with model_x, revision_x, model_y, revision_y, votes, wins / losses (of X), ties,
        both_bad, win_rate (of X over Y, ties and both bad counted half) and its 95% interval
        low .. high.
    """
    models, a, b, score, counted = comparisons(votes)
    rows = []
    for x in reversed(range(len(models))):
        for y in reversed(range(x)):
            mine = (a == x) & (b == y)
            theirs = (a == y) & (b == x)
            s = np.where(mine, score, 1 - score)[mine | theirs]  # X's scores, in the order given
            if not len(s):
                continue
            kinds = [counted[k]["choice"] for k in np.flatnonzero(mine | theirs)]
            low, high = percentile_interval(lambda idx: s[idx].mean(), len(s), resamples, seed)
            rows.append({"model_x": models[x].name, "revision_x": models[x].revision, "model_y": models[y].name,
                         "revision_y": models[y].revision, "votes": len(s), "wins": int((s == 1).sum()),
                         "losses": int((s == 0).sum()), "ties": kinds.count("tie"),
                         "both_bad": kinds.count("both_bad"), "win_rate": float(s.mean()), "low": float(low),
                         "high": float(high)})
    return rows


def fit(a: np.ndarray, b: np.ndarray, score: np.ndarray, m: int, prior: float = PRIOR,
        start: np.ndarray | None = None) -> np.ndarray:
    """The penalised maximum-likelihood natural-log strengths (m,) of the module docstring's model."""
    wins = np.zeros((m, m))  # wins[i, j]: i's score against j, summed over their votes
    np.add.at(wins, (a, b), score)
    np.add.at(wins, (b, a), 1 - score)
    games = wins + wins.T

    def objective(theta):
        log_p = -np.logaddexp(0, theta[None, :] - theta[:, None])  # log P(i beats j), (m, m)
        return (wins * log_p).sum() - prior / 2 * theta @ theta

    theta = np.zeros(m) if start is None else start.copy()
    for _ in range(100):
        p = 1 / (1 + np.exp(theta[None, :] - theta[:, None]))
        gradient = (wins - games * p).sum(axis=1) - prior * theta
        curvature = games * p * (1 - p)
        hessian = curvature - np.diag(curvature.sum(axis=1) + prior)  # negative definite: prior > 0
        step = np.linalg.solve(-hessian, gradient)
        t, now = 1.0, objective(theta)
        while objective(theta + t * step) < now + 1e-4 * t * gradient @ step and t > 1e-10:
            t /= 2
        theta = theta + t * step
        if np.abs(t * step).max(initial=0) < 1e-10:
            break
    return theta


def to_ratings(theta: np.ndarray) -> np.ndarray:
    ratings = SCALE * theta
    return ratings - ratings.mean() + CENTRE


def bradley_terry(votes: list[dict], resamples: int = RESAMPLES, seed: int = SEED, prior: float = PRIOR) -> list[dict]:
    """Every voted revision rated on one scale, best first (the module docstring has the model).

    Returns:
        rows with model, revision, repo, rating, its 95% interval low .. high, and votes (the
        counted votes it took part in). An interval leaves out the resamples without the model.
    """
    if prior <= 0:
        raise ValueError(f"prior {prior} must be positive: without it a model that never loses has no finite rating")
    models, a, b, score, _ = comparisons(votes)
    m = len(models)
    if not m:
        return []
    theta = fit(a, b, score, m, prior)

    def resampled(idx):
        present = np.bincount(a[idx], minlength=m) + np.bincount(b[idx], minlength=m) > 0
        ratings = SCALE * fit(a[idx], b[idx], score[idx], m, prior, start=theta)
        return np.where(present, ratings - ratings[present].mean() + CENTRE, np.nan)

    low, high = percentile_interval(resampled, len(a), resamples, seed)
    played = np.bincount(a, minlength=m) + np.bincount(b, minlength=m)
    rows = [{"model": model.name, "revision": model.revision, "repo": model.repo, "rating": float(r),
             "low": float(lo), "high": float(hi), "votes": int(n)}
            for model, r, lo, hi, n in zip(models, to_ratings(theta), low, high, played)]
    return sorted(rows, key=lambda r: -r["rating"])


def short(revision: str, length: int = 12) -> str:
    """A commit sha cut to `length` characters; a name (a model without a commit) whole."""
    is_sha = len(revision) == 40 and all(c in "0123456789abcdef" for c in revision)
    return revision[:length] if is_sha else revision


def as_markdown(pair_rows: list[dict], ranking: list[dict]) -> str:
    """The pair table and the ranking as two markdown tables (commit shas cut to 12 characters)."""
    if not pair_rows:
        return "no votes that compare two different revisions yet\n"
    lines = ["## Pairs (win rate of X over Y; ties and both bad count half; 95% bootstrap interval)", "",
             "| X | revision | Y | revision | votes | wins | losses | ties | both bad | win rate | 95% interval |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {r['model_x']} | {short(r['revision_x'])} | {r['model_y']} | {short(r['revision_y'])} | {r['votes']} "
              f"| {r['wins']} | {r['losses']} | {r['ties']} | {r['both_bad']} | {r['win_rate']:.3f} "
              f"| {r['low']:.3f} to {r['high']:.3f} |" for r in pair_rows]
    lines += ["", f"## Bradley-Terry ranking (400 * log10 strength, mean {CENTRE:.0f}; 95% bootstrap interval)", "",
              "| rank | model | revision | rating | 95% interval | votes |", "|---:|---|---|---:|---|---:|"]
    lines += [f"| {k} | {r['model']} | {short(r['revision'])} | {r['rating']:.0f} | {r['low']:.0f} to {r['high']:.0f} "
              f"| {r['votes']} |" for k, r in enumerate(ranking, 1)]
    return "\n".join(lines) + "\n"
