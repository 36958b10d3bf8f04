"""Caption diversification for kept samples that invite memorization (methods.md section 5).

Somepalli et al. (2023) show that a duplicated image memorizes far less when its captions vary.
For each diversified sample we write alternatives, one per strategy:

- MC  multiple captions: another caption of the same duplicate cluster;
- RT  random token addition: 2 vocabulary tokens inserted at random positions;
- CWR caption word repetition: 2 of the caption's words repeated at random positions;
- RC  random caption: the caption replaced by 4 random vocabulary tokens;
- RNA random number addition: a random integer inserted at a random position;
- GN  Gaussian noise on the text embedding: a training-time setting, recorded (sigma) only.

The vocabulary is the run's own: its most common caption words (nothing is downloaded).
Deterministic: each strategy's generator is seeded from (run seed, key, strategy). An
alternative is never empty and never equal to the original; a strategy that cannot make one
(MC without other captions, CWR on an empty caption) gives none rather than a mislabelled one.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import apache_beam as beam

STRATEGIES = ("MC", "RT", "CWR", "RC", "RNA")
RT_TOKENS, CWR_WORDS, RC_TOKENS = 2, 2, 4  # Somepalli et al.'s settings
MAX_NUMBER = 10_000
FALLBACK_VOCAB = ("photo", "image", "picture", "view", "scene", "detail")
_TRIES = 5  # a random draw may reproduce the caption (RC of a 4-word caption): draw again


_LOCAL = threading.local()


def _generator() -> random.Random:
    """This thread's generator, re-seeded for each draw (cheaper than a new one)."""
    rng = getattr(_LOCAL, "rng", None)
    if rng is None:
        rng = _LOCAL.rng = random.Random(0)
    return rng


def _rng(seed: int, key: str, strategy: str) -> random.Random:
    return random.Random(f"{seed}:{key}:{strategy}")


# The draws call ``Random._randbelow`` directly: ``rng.choice(seq)`` is ``seq[rng._randbelow(len(seq))]``
# and ``rng.randint(0, n)`` is ``rng._randbelow(n + 1)`` (CPython's random.py), so the sequences
# are the same as those calls', without their per-call argument checks.


def random_token_addition(caption: str, vocab, rng: random.Random, n: int = RT_TOKENS) -> str:
    words, below = caption.split(), rng._randbelow
    for _ in range(n):
        words.insert(below(len(words) + 1), vocab[below(len(vocab))])
    return " ".join(words)


def caption_word_repetition(caption: str, rng: random.Random, n: int = CWR_WORDS) -> str:
    words, below = caption.split(), rng._randbelow
    if not words:
        return ""
    for w in [words[below(len(words))] for _ in range(n)]:
        words.insert(below(len(words) + 1), w)
    return " ".join(words)


def random_caption(vocab, rng: random.Random, n: int = RC_TOKENS) -> str:
    below = rng._randbelow
    return " ".join(vocab[below(len(vocab))] for _ in range(n))


def random_number_addition(caption: str, rng: random.Random) -> str:
    words, below = caption.split(), rng._randbelow
    words.insert(below(len(words) + 1), str(below(MAX_NUMBER + 1)))
    return " ".join(words)


def _pool(caption: str, others: list[str]) -> list[str]:
    return sorted({o.strip() for o in others if o and o.strip() and o.strip() != caption.strip()})


def multiple_caption(caption: str, others: list[str], rng: random.Random) -> str:
    pool = _pool(caption, others)
    return rng.choice(pool) if pool else ""


def _draw(strategy: str, caption: str, others: list[str], vocab, rng: random.Random) -> str:
    if strategy == "MC":
        return multiple_caption(caption, others, rng)
    if strategy == "RT":
        return random_token_addition(caption, vocab, rng)
    if strategy == "CWR":
        return caption_word_repetition(caption, rng)
    if strategy == "RC":
        return random_caption(vocab, rng)
    if strategy == "RNA":
        return random_number_addition(caption, rng)
    raise ValueError(f"diversify.strategies: unknown strategy {strategy!r}")


def alternatives(key: str, caption: str, others: list[str], vocab, strategies, seed: int) -> list[tuple[str, str]]:
    """-> [(strategy, alternative)], at most one per strategy, each non-empty and != caption.
    A strategy that cannot draw one (MC without other captions, CWR without words) is skipped
    without seeding its generator: it would give none."""
    vocab = (vocab if isinstance(vocab, list) else list(vocab)) or list(FALLBACK_VOCAB)  # read only: no copy
    out = []
    rng = _generator()
    stripped = caption.strip()
    for s in strategies:
        if (s == "MC" and not _pool(caption, others)) or (s == "CWR" and not caption.split()):
            continue
        rng.seed(f"{seed}:{key}:{s}")  # as ``_rng``: a generator seeded from (seed, key, strategy)
        for _ in range(_TRIES):
            alt = _draw(s, caption, others, vocab, rng).strip()
            if alt and alt != stripped:
                out.append((s, alt))
                break
    return out


def diversify_row(row: dict, others: list[str], vocab, cfg, seed: int) -> dict | None:
    """A manifest row with decision diversify -> a diversify/ row (None when nothing applies)."""
    alts = alternatives(row["key"], row["caption"] or "", others, vocab, cfg.strategies, seed)[: cfg.n_alternatives]
    if not alts:
        return None
    return {
        "key": row["key"],
        "shard": row["shard"],
        "caption": row["caption"],
        "alternatives": [a for _, a in alts],
        "alternative_strategies": [s for s, _ in alts],
        "strategy": ",".join(s for s, _ in alts),
        "gaussian_noise_sigma": cfg.gaussian_noise_sigma,
    }


def caption_words(caption: str) -> list[str]:
    """The distinct vocabulary words of one caption (alphabetic, 3+ letters, lower case)."""
    return sorted({w.lower() for w in (caption or "").split() if w.isalpha() and len(w) >= 3})


def vocabulary_from_counts(counts: list[tuple[str, int]], size: int = 5000) -> list[str]:
    """The run's most common caption words (ties by word): RT/RC tokens, deterministic.
    A word seen in one caption only is left out when there are others (it may be a name)."""
    ranked = sorted(counts, key=lambda kv: (-kv[1], kv[0]))
    common = [w for w, n in ranked if n >= 2]
    return (common or [w for w, _ in ranked])[:size]


def cluster_captions(captions, limit: int) -> list[str]:
    """A duplicate cluster's captions, bounded and deterministic (MC's pool)."""
    return sorted({c for c in captions if c})[:limit]


_PRINTABLE = None


def printable_ascii(captions):
    """Per string of an Arrow string array (no nulls): whether it is printable ASCII and ASCII
    whitespace only (``^[\\x20-\\x7e\\t\\n\\r\\x0b\\x0c]*$``), where Arrow's ASCII word split is
    ``str.split``'s. One table lookup per byte; a numpy bool array."""
    import numpy as np

    from transforms.mt_streams import utf8_buffers

    global _PRINTABLE
    if _PRINTABLE is None:
        table = np.zeros(256, dtype=bool)
        table[0x20:0x7F] = True
        table[[0x09, 0x0A, 0x0B, 0x0C, 0x0D]] = True
        _PRINTABLE = table
    offsets, data = utf8_buffers(captions)
    bad = np.flatnonzero(~_PRINTABLE[data[offsets[0] : offsets[-1]]]) + offsets[0] if len(offsets) > 1 else []
    out = np.ones(len(offsets) - 1, dtype=bool)
    if len(bad):
        out[np.unique(np.searchsorted(offsets, bad, side="right") - 1)] = False
    return out


def caption_word_counts(captions):
    """``caption_words`` of every caption (an Arrow string array), counted: a (word, count)
    table, a word counted once per caption. Captions of printable ASCII and ASCII spaces are
    split by Arrow (the same words as ``str.split``); the others by ``caption_words``."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(captions, pa.ChunkedArray):
        captions = captions.combine_chunks()
    captions = captions.filter(pc.is_valid(captions))
    simple = pa.array(printable_ascii(captions))
    words = pc.ascii_split_whitespace(captions.filter(simple))
    raw = pc.dictionary_encode(pc.list_flatten(words))  # the checks and lower-casing run on distinct words
    distinct = raw.dictionary
    keep = pc.and_(pc.ascii_is_alpha(distinct), pc.greater_equal(pc.binary_length(distinct), 3))
    lowered = pc.dictionary_encode(pc.ascii_lower(distinct.filter(keep)))  # names in first-use order
    names = lowered.dictionary.to_pylist()
    code_of = np.full(len(distinct), -1, dtype=np.int64)  # raw word -> its vocabulary word, -1: none
    code_of[np.flatnonzero(keep.to_numpy(zero_copy_only=False))] = lowered.indices.to_numpy(zero_copy_only=False)
    codes = code_of[raw.indices.to_numpy(zero_copy_only=False)]
    parent = pc.list_parent_indices(words).to_numpy(zero_copy_only=False).astype(np.int64)[codes >= 0]
    codes = codes[codes >= 0]
    width = max(1, len(names))
    pair = np.sort(parent * width + codes, kind="stable")
    first = np.ones(len(pair), dtype=bool)  # a (caption, word) pair once: a word counts once per caption
    np.not_equal(pair[1:], pair[:-1], out=first[1:])
    counts = dict(zip(names, np.bincount(pair[first] % width, minlength=len(names)).tolist(), strict=True))
    for caption in captions.filter(pc.invert(simple)).to_pylist():
        for w in caption_words(caption):
            counts[w] = counts.get(w, 0) + 1
    return pa.table({"word": pa.array(list(counts), pa.string()), "count": pa.array(list(counts.values()), pa.int64())})


def _top_words(item, size: int) -> Iterator:
    """(bucket, word-count tables) -> one (word, count) table of the bucket's ``size`` most common
    words (ties by word), summed over the tables: the global top ``size`` is among the buckets'
    tops (a bucket holds all of its words' counts)."""
    import pyarrow as pa

    _, tables = item
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return
    summed = pa.concat_tables(tables).group_by("word").aggregate([("count", "sum")])
    ranked = summed.sort_by([("count_sum", "descending"), ("word", "ascending")]).slice(0, size)
    yield pa.table({"word": ranked.column("word"), "count": ranked.column("count_sum")})


def vocabulary_from_tables(tables: list, size: int) -> list[str]:
    """The buckets' top-word tables (``_top_words``) -> ``vocabulary_from_counts`` of the global
    top ``size`` (as ``Top.Of`` over (word, count) pairs ranked by (-count, word) gives it)."""
    import pyarrow as pa

    tables = [t for t in tables if t.num_rows]
    if not tables:
        return vocabulary_from_counts([], size)
    ranked = pa.concat_tables(tables).sort_by([("count", "descending"), ("word", "ascending")]).slice(0, size)
    counts = zip(ranked.column("word").to_pylist(), ranked.column("count").to_pylist(), strict=True)
    return vocabulary_from_counts(list(counts), size)


def _diversify_bucket(item, vocab: list[str], cfg, seed: int, limit: int) -> Iterator:
    """(bucket, {"rows": tables of rows to diversify, "captions": (cluster_id, caption) tables})
    -> one table of the bucket's diversify/ rows (with their shard): ``diversify_row`` of each
    row, computed for the whole table at once (``transforms.diversify_columns``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    _, grouped = item
    rows = [t for t in grouped["rows"] if t.num_rows]
    if not rows:
        return
    rows = pa.concat_tables(rows) if len(rows) > 1 else rows[0]
    from transforms.diversify_columns import cluster_pools, diversify_table

    pools = {}
    if "MC" in cfg.strategies:  # only MC reads the clusters' captions
        pools = cluster_pools(grouped["captions"], pc.unique(rows.column("cluster_id").combine_chunks()), limit)
    table = diversify_table(rows, pools, vocab, cfg, seed)
    if table is not None:
        yield table


def _with_shard():
    import pyarrow as pa

    from schemas import arrow

    return arrow.DIVERSIFY.append(pa.field("shard", pa.string()))


def _joined(item, vocab: list[str], cfg, seed: int) -> Iterator[dict]:
    _, grouped = item
    others = next(iter(grouped["captions"]), [])
    for row in grouped["rows"]:
        out = diversify_row(row, others, vocab, cfg, seed)
        if out is not None:
            yield out


class DiversifyCaptions(beam.PTransform):
    """{"rows": manifest rows, "annotations": Annotation} -> diversify/ rows (dicts); or, from
    the per-shard stage (``transforms.shard_stage``), {"rows": tables of the rows to diversify
    (key, shard, caption, cluster_id), "words": (word, count) tables, "captions": (cluster_id,
    caption) tables of clustered samples} -> tables of diversify/ rows with their shard.

    MC needs the other captions of a sample's duplicate cluster: they are grouped per cluster
    (bounded) and joined by cluster id (tables: per hash bucket of the cluster id, ``buckets``);
    RT and RC draw from the run's common caption words.
    """

    def __init__(self, cfg, seed: int, buckets: int = 1):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.buckets = max(1, buckets)

    def expand(self, inputs):
        if "annotations" not in inputs:
            return self._tables(inputs)
        rows = inputs["rows"]
        limit = self.cfg.max_cluster_captions
        ok = inputs["annotations"] | "OkCaptions" >> beam.Filter(lambda a: a.status == "ok" and bool(a.caption))
        word_counts = (
            ok
            | "VocabWords" >> beam.FlatMap(lambda a: caption_words(a.caption))
            | "CountVocab" >> beam.combiners.Count.PerElement()
        )
        clustered = (
            ok
            | "InCluster" >> beam.Filter(lambda a: a.cluster_size > 1)
            | "CaptionByCluster" >> beam.Map(lambda a: (a.cluster_id, a.caption))
        )
        vocab = self._vocabulary(word_counts)
        captions = (
            clustered
            | "GroupCaptions" >> beam.GroupByKey()
            | "BoundCaptions" >> beam.MapTuple(lambda cid, caps: (cid, cluster_captions(caps, limit)))
        )
        keyed = (
            rows
            | "ToDiversify" >> beam.Filter(lambda r: r["decision"] == "diversify")
            | "ByCluster" >> beam.Map(lambda r: (r["cluster_id"], r))
        )
        return (
            {"rows": keyed, "captions": captions}
            | "JoinCaptions" >> beam.CoGroupByKey()
            | "Diversify" >> beam.FlatMap(_joined, vocab=beam.pvalue.AsSingleton(vocab), cfg=self.cfg, seed=self.seed)
        )

    def _vocabulary(self, word_counts):
        size = self.cfg.vocabulary_size
        return (
            word_counts
            | "TopCounts" >> beam.combiners.Top.Of(size, key=lambda kv: (-kv[1], kv[0]), reverse=True)
            | "TopVocab" >> beam.Map(vocabulary_from_counts, size=size)
        )

    def _tables(self, inputs):
        from transforms.write import split_table

        n, size = self.buckets, self.cfg.vocabulary_size
        vocab = (  # one table of top words per bucket crosses, not a (word, count) element per word
            inputs["words"]
            | "WordBuckets" >> beam.FlatMap(split_table, "word", n)
            | "GroupWords" >> beam.GroupByKey()
            | "TopOfBucket" >> beam.FlatMap(_top_words, size=size)
            | "TopTables" >> beam.combiners.ToList()
            | "TopVocab" >> beam.Map(vocabulary_from_tables, size=size)
        )
        joined = {
            "rows": inputs["rows"] | "RowBuckets" >> beam.FlatMap(split_table, "cluster_id", n),
            "captions": inputs["captions"] | "CaptionBuckets" >> beam.FlatMap(split_table, "cluster_id", n),
        } | "JoinCaptions" >> beam.CoGroupByKey()
        return joined | "Diversify" >> beam.FlatMap(
            _diversify_bucket,
            vocab=beam.pvalue.AsSingleton(vocab),
            cfg=self.cfg,
            seed=self.seed,
            limit=self.cfg.max_cluster_captions,
        )
