"""Caption diversification for kept samples that invite memorization (methods.md section 5).

Somepalli et al. (2023) show that a duplicated image memorizes far less when its captions vary.
For each diversified sample we write alternatives, one per strategy:

- MC  multiple captions: another caption of the same duplicate cluster;
- RT  random token addition: 2 vocabulary tokens inserted at random positions;
- CWR caption word repetition: 2 of the caption's words repeated at random positions;
- RC  random caption: the caption replaced by 4 random vocabulary tokens;
- RNA random number addition: a random integer inserted at a random position;
- GN  Gaussian noise on the text embedding: a training-time setting, recorded (sigma) only.

Deterministic: the generator is seeded from (run seed, key). An alternative is never empty and
never equal to the original caption.
"""

from __future__ import annotations

import random

STRATEGIES = ("MC", "RT", "CWR", "RC", "RNA")


def _rng(seed: int, key: str, strategy: str) -> random.Random:
    return random.Random(f"{seed}:{key}:{strategy}")


def random_token_addition(caption: str, vocab: list[str], rng: random.Random, n: int = 2) -> str:
    words = caption.split()
    for _ in range(n):
        words.insert(rng.randint(0, len(words)), rng.choice(vocab))
    return " ".join(words)


def caption_word_repetition(caption: str, rng: random.Random, n: int = 2) -> str:
    words = caption.split()
    if not words:
        return caption
    picks = [rng.choice(words) for _ in range(n)]
    for w in picks:
        words.insert(rng.randint(0, len(words)), w)
    return " ".join(words)


def random_caption(vocab: list[str], rng: random.Random, n: int = 4) -> str:
    return " ".join(rng.choice(vocab) for _ in range(n))


def random_number_addition(caption: str, rng: random.Random) -> str:
    words = caption.split()
    words.insert(rng.randint(0, len(words)), str(rng.randint(0, 10_000)))
    return " ".join(words)


def multiple_caption(caption: str, others: list[str], rng: random.Random) -> str | None:
    pool = sorted({o.strip() for o in others if o.strip() and o.strip() != caption.strip()})
    return rng.choice(pool) if pool else None


def alternatives(key: str, caption: str, others: list[str], vocab: list[str], strategies, seed: int):
    """-> [(strategy, alternative)], at most one per strategy, each non-empty and != caption."""
    vocab = vocab or ["photo", "image", "picture", "view", "scene", "detail"]
    out = []
    for s in strategies:
        rng = _rng(seed, key, s)
        if s == "MC":
            alt = multiple_caption(caption, others, rng)
        elif s == "RT":
            alt = random_token_addition(caption, vocab, rng)
        elif s == "CWR":
            alt = caption_word_repetition(caption, rng)
        elif s == "RC":
            alt = random_caption(vocab, rng)
        elif s == "RNA":
            alt = random_number_addition(caption, rng)
        else:
            raise ValueError(f"diversify.strategies: unknown strategy {s!r}")
        for _ in range(3):  # a random edit may reproduce the caption (e.g. an empty caption): retry
            if alt is None or (alt.strip() and alt.strip() != caption.strip()):
                break
            alt = random_token_addition(caption, vocab, rng, 1)
        if alt is not None and alt.strip() and alt.strip() != caption.strip():
            out.append((s, alt.strip()))
    return out


def diversify_row(row: dict, others: list[str], vocab: list[str], cfg, seed: int) -> dict | None:
    """A manifest row with decision diversify -> a diversify/ row (None when nothing applies)."""
    alts = alternatives(row["key"], row["caption"] or "", others, vocab, cfg.strategies, seed)
    if not alts:
        return None
    alts = alts[: cfg.n_alternatives] if len(alts) > cfg.n_alternatives else alts
    return {
        "key": row["key"],
        "shard": row["shard"],
        "caption": row["caption"],
        "alternatives": [a for _, a in alts],
        "alternative_strategies": [s for s, _ in alts],
        "strategy": ",".join(s for s, _ in alts),
        "gaussian_noise_sigma": cfg.gaussian_noise_sigma,
    }


def vocabulary_from_counts(counts: list[tuple[str, int]], size: int = 2000) -> list[str]:
    """The run's most frequent caption words (ties by word): RT/RC tokens, deterministic."""
    ranked = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    return [w for w, _ in ranked[:size]]
