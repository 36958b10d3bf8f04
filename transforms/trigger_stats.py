"""Association statistics for memorization triggers (methods.md section 3).

For keyword w and cluster c over N captions: support (n_wc, n_w), effect (P(c|w), P(w|c),
normalized PMI) and significance: a one-sided hypergeometric test (is n_wc larger than chance
when n_w captions are drawn from N, n_c of which are in c?) with Benjamini-Hochberg q-values
over all tested pairs. Chi-square misbehaves for small clusters and at LAION scale; raw
frequency has no notion of chance.
"""

from __future__ import annotations

import math

import numpy as np


def npmi(n_both: int, n_a: int, n_b: int, n: int) -> float:
    """Normalized pointwise mutual information in [-1, 1]; 1 = always together."""
    if n_both <= 0 or n_a <= 0 or n_b <= 0 or n <= 0:
        return -1.0
    p_ab, p_a, p_b = n_both / n, n_a / n, n_b / n
    if p_ab >= 1.0:
        return 1.0
    return math.log(p_ab / (p_a * p_b)) / -math.log(p_ab)


def hypergeom_pvalue(n_both: int, n_total: int, n_group: int, n_draws: int) -> float:
    """P(X >= n_both), X ~ Hypergeometric(N=n_total, K=n_group, n=n_draws)."""
    from scipy.stats import hypergeom

    return float(hypergeom.sf(n_both - 1, n_total, n_group, n_draws))


def hypergeom_pvalues(n_both, n_total, n_group, n_draws) -> list[float]:
    """``hypergeom_pvalue`` over arrays (one scipy call; the same floats as one call each)."""
    if not len(n_both):
        return []
    from scipy.stats import hypergeom

    k = np.asarray(n_both, dtype=np.int64)
    return np.atleast_1d(hypergeom.sf(k - 1, n_total, n_group, n_draws)).astype(float).tolist()


def bh_qvalues(pvalues: list[float] | np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), monotone, in the input order."""
    p = np.asarray(pvalues, dtype=np.float64)
    m = len(p)
    if m == 0:
        return p
    order = np.argsort(p, kind="mergesort")
    ranked = p[order] * m / np.arange(1, m + 1)
    q_sorted = np.minimum.accumulate(ranked[::-1])[::-1]
    q = np.empty(m)
    q[order] = np.minimum(q_sorted, 1.0)
    return q


def keyword_cluster_rows(candidates: list[dict], n_total: int, cfg) -> list[dict]:
    """candidates: keyword, cluster_id, n_keyword, n_cluster, n_both (support already met).

    All candidates are tested (they make the BH family); rows that pass the effect thresholds
    and q <= cfg.max_q_value are returned, ranked by NPMI.
    """
    rows = []
    pvalues = hypergeom_pvalues(
        [c["n_both"] for c in candidates],
        n_total,
        [c["n_cluster"] for c in candidates],
        [c["n_keyword"] for c in candidates],
    )
    for c, p in zip(candidates, pvalues, strict=True):
        rows.append(
            dict(
                c,
                p_value=p,
                npmi=npmi(c["n_both"], c["n_keyword"], c["n_cluster"], n_total),
                p_cluster_given_keyword=c["n_both"] / c["n_keyword"],
                p_keyword_given_cluster=c["n_both"] / c["n_cluster"],
            )
        )
    q = bh_qvalues([r["p_value"] for r in rows])
    out = []
    for r, qv in zip(rows, q, strict=True):
        r["q_value"] = float(qv)
        if (
            qv <= cfg.max_q_value
            and r["p_cluster_given_keyword"] >= cfg.min_p_cluster_given_keyword
            and r["p_keyword_given_cluster"] >= cfg.min_p_keyword_given_cluster
        ):
            out.append(r)
    return sorted(out, key=lambda r: (-r["npmi"], r["keyword"], r["cluster_id"]))


def keyword_object_rows(candidates: list[dict], cfg, related) -> list[dict]:
    """candidates: keyword, object, n_total (captions not naming the object), n_keyword,
    n_object, n_both. Returns significant rows with lift and relation."""
    rows = []
    pvalues = hypergeom_pvalues(*([c[f] for c in candidates] for f in ("n_both", "n_total", "n_object", "n_keyword")))
    for c, p in zip(candidates, pvalues, strict=True):
        base = c["n_object"] / c["n_total"] if c["n_total"] else 0.0
        lift = (c["n_both"] / c["n_keyword"]) / base if base > 0 and c["n_keyword"] else 0.0
        rows.append(dict(c, p_value=p, lift=lift))
    q = bh_qvalues([r["p_value"] for r in rows])
    out = []
    for r, qv in zip(rows, q, strict=True):
        r["q_value"] = float(qv)
        if (
            qv <= cfg.max_q_value
            and r["lift"] >= cfg.min_object_lift
            and (r["n_both"] / r["n_keyword"] >= cfg.min_p_object_given_keyword)
        ):
            r["relation"] = "implicit_intended" if related(r["keyword"], r["object"]) else "unintended"
            out.append(r)
    return sorted(out, key=lambda r: (r["relation"] != "unintended", r["q_value"], r["keyword"], r["object"]))
