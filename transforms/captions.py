"""Caption analytics: exact and near-duplicate captions, template captions, and per image
cluster whether it is full duplication (one caption repeated) or partial (varied captions).

Pure functions; ``transforms.triggers`` wires them into Beam, ``scripts/caption_report.py``
runs them over plain caption lists.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections import Counter

from transforms.keywords import normalize_caption

_NUMBER = re.compile(r"^\d[\d.,:/-]*$")
SLOT = "*"


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def cluster_duplication(captions: list[str], full_share: float = 0.5, max_pairs: int = 50) -> dict:
    """Full duplication when one normalized caption repeats over >= full_share of the cluster.

    diversity: mean pairwise Jaccard distance of the captions' word sets (first max_pairs
    captions in sorted order, so it is deterministic and bounded).
    """
    normalized = sorted(normalize_caption(c) for c in captions)
    sets = [frozenset(c.split()) for c in normalized[:max_pairs]]
    pairs = list(itertools.combinations(sets, 2))
    diversity = sum(1 - jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else 0.0
    return duplication_summary(normalized, full_share, diversity)


def duplication_summary(normalized: list[str], full_share: float, diversity: float) -> dict:
    """A cluster's duplication record from its sorted normalized captions and their diversity."""
    counts = Counter(normalized)
    modal = max(counts.values()) if counts else 0
    share = modal / len(normalized) if normalized else 0.0
    full = modal >= 2 and share >= full_share  # one caption *repeated*: two different ones are partial
    return {
        "class": "full" if full else "partial",
        "modal_share": share,
        "distinct": len(counts),
        "size": len(normalized),
        "diversity": diversity,
    }


def skeleton(caption: str, frequent: frozenset[str] | set[str], min_fixed: int = 2) -> str | None:
    """The caption with its rare words and numbers as slots: ``* for sale - *``; None when the
    caption has fewer than ``min_fixed`` fixed words or no slot (then it is no template)."""
    return skeleton_of_norm(normalize_caption(caption), frequent, min_fixed)


def skeleton_of_norm(normalized: str, frequent: frozenset[str] | set[str], min_fixed: int = 2) -> str | None:
    """``skeleton`` of an already normalized caption."""
    words = normalized.split()
    if isinstance(frequent, frozenset) and _fixed_words(frequent).issuperset(words):
        return None  # every word fixed: no slot (the common case, checked without the loop)
    out: list[str] = []
    fixed = 0
    for word in words:
        if word in frequent and not _NUMBER.match(word):
            out.append(word)
            fixed += 1
        elif not out or out[-1] != SLOT:
            out.append(SLOT)
    if fixed < min_fixed or SLOT not in out:
        return None
    return " ".join(out)


@functools.lru_cache(maxsize=8)
def _fixed_words(frequent: frozenset[str]) -> frozenset[str]:
    """The words ``skeleton`` keeps: frequent and not a number."""
    return frozenset(w for w in frequent if not _NUMBER.match(w))


def minhash_bands(caption: str, num_perm: int = 64, bands: int = 16, seed: int = 1) -> list[str]:
    """LSH band keys of the caption's word set (datasketch MinHash): captions whose word sets
    have Jaccard >= ~0.8 share a band key with high probability. Word sets, not 3-shingles:
    captions are short, and one inserted word breaks three shingles."""
    return list(_band_keys(normalize_caption(caption), num_perm, bands, seed))


@functools.lru_cache(maxsize=1 << 16)
def _band_keys(normalized: str, num_perm: int, bands: int, seed: int) -> tuple[str, ...]:
    """Band keys of one normalized caption, cached: repeated captions cost one lookup."""
    rows = num_perm // bands
    hv = _hashvalues(normalized, num_perm, seed).tolist()
    return tuple(f"{b}:" + ",".join(map(str, hv[b * rows : (b + 1) * rows])) for b in range(bands))


_WORD_HASHES: dict = {}


def _word_vector(word: str, num_perm: int, seed: int):
    """One word's MinHash hash values ("" gives the empty MinHash's), cached per process."""
    cache = _WORD_HASHES.setdefault((num_perm, seed), {})
    v = cache.get(word)
    if v is None:
        v = _minhash(word, num_perm, seed).hashvalues
        if len(cache) < 500_000:
            cache[word] = v
    return v


def _hashvalues(normalized: str, num_perm: int, seed: int):
    """The caption's MinHash hash values, datasketch's exactly: the element-wise minimum of its
    words' one-word MinHashes (a MinHash is the minimum over its values), each word hashed and
    permuted once per process."""
    import numpy as np

    words = sorted(set(normalized.split()))
    if not words:
        return _minhash("", num_perm, seed).hashvalues
    cache = _WORD_HASHES.setdefault((num_perm, seed), {})
    vectors = []
    for w in words:
        v = cache.get(w)
        if v is None:
            v = _minhash(w, num_perm, seed).hashvalues
            if len(cache) < 500_000:
                cache[w] = v
        vectors.append(v)
    return vectors[0] if len(vectors) == 1 else np.minimum.reduce(vectors)


_PERMUTATIONS: dict = {}


def _minhash(normalized: str, num_perm: int, seed: int):
    from datasketch import MinHash

    perms = _PERMUTATIONS.get((num_perm, seed))
    if perms is None:  # drawn once per process: MinHash draws them from the seed on every call
        template = MinHash(num_perm=num_perm, seed=seed)
        perms = _PERMUTATIONS[(num_perm, seed)] = (template.permutations, template.scheme)
    mh = MinHash(num_perm=num_perm, seed=seed, permutations=perms[0], scheme=perms[1])
    mh.update_batch([w.encode() for w in sorted(set(normalized.split()))])
    return mh


def near_duplicate_groups(captions: list[str], threshold: float = 0.8) -> list[list[int]]:
    """Indices of captions that are near duplicates of another (not exact), grouped."""
    from datasketch import MinHashLSH

    norm = [normalize_caption(c) for c in captions]
    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    hashes = []
    for i, text in enumerate(norm):
        mh = _minhash(text, 64, 1)
        hashes.append(mh)
        lsh.insert(str(i), mh)
    parent = list(range(len(norm)))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, mh in enumerate(hashes):
        for j in map(int, lsh.query(mh)):
            if j != i and jaccard(frozenset(norm[i].split()), frozenset(norm[j].split())) >= threshold:
                parent[find(i)] = find(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(norm)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len({norm[i] for i in g}) > 1]


def template_groups(captions: list[str], min_df: int = 20, min_count: int = 5, min_distinct: int = 3):
    """skeleton -> member indices, for skeletons shared by >= min_count captions with
    >= min_distinct different texts."""
    df: Counter = Counter()
    norm = [normalize_caption(c) for c in captions]
    for text in norm:
        df.update(set(text.split()))
    frequent = frozenset(w for w, n in df.items() if n >= min_df)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        sk = skeleton(c, frequent)
        if sk is not None:
            groups.setdefault(sk, []).append(i)
    return {
        sk: idx for sk, idx in groups.items() if len(idx) >= min_count and len({norm[i] for i in idx}) >= min_distinct
    }
