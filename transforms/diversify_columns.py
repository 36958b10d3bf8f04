"""Diversification of a whole table of rows at once: the same diversify/ rows as ``diversify_row``
(transforms/diversify.py) gives row by row, faster.

Each (row, strategy) generator is ``random.Random(f"{seed}:{key}:{strategy}")``. Their first
outputs are computed for all rows together (``transforms.mt_streams``), every draw of a strategy
(``_randbelow``) is replayed over all rows with numpy (``Draws``), and the alternatives are
assembled by Arrow (each caption's word list with the drawn tokens inserted, joined: ``inserted``;
MC's pick per row from its cluster's pool). A row whose generator ran out of
precomputed outputs, or whose first draw was not usable (an RC draw equal to the caption: the
per-row code draws again), is made by ``alternatives`` itself, so every row is what
``diversify_row`` gives.
"""

from __future__ import annotations

import numpy as np

from transforms.diversify import MAX_NUMBER, RC_TOKENS
from transforms.mt_streams import joined_streams

# precomputed outputs per generator, by its number of draws (each rejected with probability < 1/2,
# about 0.45 at worst in practice): a generator needing more than 6 per draw is rare, and redone
DRAWS = {"MC": 1, "RT": 4, "CWR": 4, "RC": RC_TOKENS, "RNA": 2}
OUTPUTS_PER_DRAW = 6
_MAX_N = 1 << 31  # _randbelow(n) reads one output while n.bit_length() <= 32


class Draws:
    """``_randbelow`` replayed on each generator's precomputed outputs (one column per generator)."""

    def __init__(self, outputs: np.ndarray):
        self.outputs = outputs  # (outputs, generators)
        self.pos = np.zeros(outputs.shape[1], dtype=np.int64)
        self.lost = np.zeros(outputs.shape[1], dtype=bool)  # ran out of outputs: redraw with random.Random

    def below(self, n) -> np.ndarray:
        """One ``rng._randbelow(n)`` per generator (``n`` an int or one per generator, >= 1)."""
        n = np.asarray(n, dtype=np.int64)
        shift = (32 - np.frexp(n.astype(np.float64))[1]).astype(np.uint32)  # 32 - n.bit_length()
        k, m = self.outputs.shape
        flat = self.outputs.reshape(-1)
        # every generator's first try at once (no index of the ones left), then the rejected ones
        usable = self.pos < k
        self.lost |= ~usable
        value = (flat.take(np.minimum(self.pos, k - 1) * m + np.arange(m)) >> shift).astype(np.int64)
        self.pos += usable
        ok = (value < n) & usable
        got = np.where(ok, value, 0)
        todo = np.flatnonzero(~ok & usable)
        n, shift = np.broadcast_to(n, (m,)), np.broadcast_to(shift, (m,))
        while todo.size:
            pos = self.pos[todo]
            short = pos >= k
            if short.any():
                self.lost[todo[short]] = True
                todo, pos = todo[~short], pos[~short]
            value = (flat.take(pos * m + todo) >> shift[todo]).astype(np.int64)
            self.pos[todo] = pos + 1
            ok = value < n[todo]
            got[todo[ok]] = value[ok]
            todo = todo[~ok]
        return got


def usable_vocabulary(vocab: list[str]) -> bool:
    """Whether every token is one word (so RT/RC alternatives need no strip and no redraw check
    beyond RC's) and the draws fit one output each."""
    return 0 < len(vocab) < _MAX_N and all(isinstance(v, str) and v.split() == [v] for v in vocab)


def words_of(captions) -> tuple:
    """Captions (an Arrow string array, no nulls) -> (their words flat, Arrow; each caption's word
    count, numpy): ``str.split()``'s words, split by Arrow when every caption is printable ASCII
    and ASCII whitespace (where the two agree), else by ``str.split``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.diversify import printable_ascii

    if printable_ascii(captions).all():
        words = pc.ascii_split_whitespace(captions)
        flat, parent = pc.list_flatten(words), pc.list_parent_indices(words)
        keep = pc.greater(pc.binary_length(flat), 0)
        parent = parent.filter(keep).to_numpy(zero_copy_only=False)
        return flat.filter(keep), np.bincount(parent, minlength=len(captions)).astype(np.int64)
    split = [c.split() for c in captions.to_pylist()]
    flat = pa.array([w for ws in split for w in ws], pa.string())
    return flat, np.fromiter((len(ws) for ws in split), dtype=np.int64, count=len(split))


def inserted(flat, starts: np.ndarray, lengths: np.ndarray, tokens: list, extra=None):
    """Word lists with tokens inserted, joined by spaces (one string per list).

    ``flat`` holds the lists' words (list r: ``flat[starts[r]:starts[r] + lengths[r]]``);
    ``tokens`` is [(position drawn, index of the token in ``flat`` + ``extra``)] in insertion
    order, each position drawn in the list as the earlier insertions left it (``list.insert``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    final = [np.asarray(p).copy() for p, _ in tokens]
    for t in range(len(final)):  # a later insertion at or before an earlier token moves it right
        for u in range(t):
            final[u] += final[t] <= final[u]
    size = lengths + len(tokens)
    offsets = np.zeros(len(size) + 1, dtype=np.int64)
    np.cumsum(size, out=offsets[1:])
    # the output's word slots take the lists' words in order; its token slots, the tokens
    is_token = np.zeros(offsets[-1], dtype=bool)
    at = [offsets[:-1] + f for f in final]
    for a in at:
        is_token[a] = True
    n_words = int(lengths.sum())
    words = np.arange(n_words, dtype=np.int64)
    if _contiguous(starts, lengths):
        words += starts[0] if len(starts) else 0
    else:
        words += np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    source = np.empty(offsets[-1], dtype=np.int64)
    source[~is_token] = words
    for a, (_, index) in zip(at, tokens, strict=True):
        source[a] = index
    values = pa.concat_arrays([flat, extra]) if extra is not None else flat
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values.take(pa.array(source)))
    return pc.binary_join(lists, " ")


def _contiguous(starts: np.ndarray, lengths: np.ndarray) -> bool:
    """Whether each list's words follow the previous list's (``starts`` the running sum)."""
    return bool(len(starts) == 0 or (starts[1:] == starts[:-1] + lengths[:-1]).all())


def cluster_pools(tables, ids, limit: int) -> dict:
    """(cluster_id, caption) tables -> {cluster id in ``ids``: ``cluster_captions`` of its
    captions (sorted, unique, non-empty, the first ``limit``)}; clusters without a caption are
    left out (as an empty pool). Arrow sorts and cuts; Python only slices the kept captions."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.diversify import cluster_captions

    parts = [t.select(["cluster_id", "caption"]) for t in tables if t.num_rows]
    if not parts:
        return {}
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]  # one lookup set of ``ids``, not one a part
    table = table.filter(pc.is_in(table.column("cluster_id"), value_set=ids))
    if not table.num_rows:
        return {}
    pools = {}
    unnamed = pc.is_null(table.column("cluster_id"))
    if pc.any(unnamed).as_py():  # a null cluster id: its own pool, as the per-row code gives it
        pools[None] = cluster_captions(table.filter(unnamed).column("caption").to_pylist(), limit)
        table = table.filter(pc.invert(unnamed))
    caption = table.column("caption")
    table = table.filter(pc.and_(pc.is_valid(caption), pc.not_equal(caption, "")))
    if not table.num_rows:
        return {k: v for k, v in pools.items() if v}
    pairs = table.group_by(["cluster_id", "caption"]).aggregate([])
    pairs = pairs.sort_by([("cluster_id", "ascending"), ("caption", "ascending")])
    cids = pairs.column("cluster_id").combine_chunks()
    starts = np.flatnonzero(np.r_[True, pc.not_equal(cids[1:], cids[:-1]).to_numpy(zero_copy_only=False)])
    ends = np.r_[starts[1:], len(cids)]
    names, captions = cids.take(pa.array(starts)).to_pylist(), pairs.column("caption").to_pylist()
    pools.update(
        (name, captions[s : min(e, s + limit)])
        for name, s, e in zip(names, starts.tolist(), ends.tolist(), strict=True)
    )
    return {k: v for k, v in pools.items() if v}


def mc_pools(pools: dict) -> dict:
    """cluster id -> (its captions stripped, non-empty, sorted, unique; their positions): a row's
    MC pool is this less its own stripped caption (``transforms.diversify._pool``)."""
    out = {}
    for cid, others in pools.items():
        pool = sorted({o.strip() for o in others if o and o.strip()})
        out[cid] = (pool, {c: i for i, c in enumerate(pool)})
    return out


class _Rows:
    """The columns of a table of rows to diversify that the strategies read."""

    def __init__(self, rows, pools: dict, vocab: list[str], seed: int):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.n, self.seed, self.vocab = rows.num_rows, seed, pa.array(vocab, pa.string())
        self.keys = rows.column("key").combine_chunks()
        self.captions = pc.fill_null(rows.column("caption").combine_chunks(), "")
        self.flat, self.lengths = words_of(self.captions)
        self.starts = np.cumsum(self.lengths) - self.lengths
        self.cluster_ids, self.pools = rows.column("cluster_id"), pools
        self.redo = np.zeros(self.n, dtype=bool)  # rows left to ``alternatives``

    def draws(self, strategy: str, rows: np.ndarray) -> Draws:
        """The generators ``random.Random(f"{seed}:{key}:{strategy}")`` of the given rows' keys."""
        keys = self.keys if len(rows) == self.n else self.keys.take(pa_indices(rows))
        return Draws(joined_streams(f"{self.seed}:", keys, f":{strategy}", DRAWS[strategy] * OUTPUTS_PER_DRAW))

    def column(self, strategy: str):
        """One strategy's alternative of every row (an Arrow string array, null where it gives
        none or where the row is redone per row)."""
        import pyarrow as pa

        if strategy == "MC":
            return self._mc()
        rows = np.flatnonzero(self.lengths > 0) if strategy == "CWR" else np.arange(self.n)
        if not rows.size:
            return pa.nulls(self.n, pa.string())
        d, L, starts, v = self.draws(strategy, rows), self.lengths[rows], self.starts[rows], len(self.vocab)
        nf = len(self.flat)
        if strategy == "RT":
            p1, t1, p2, t2 = d.below(L + 1), d.below(v), d.below(L + 2), d.below(v)
            got = inserted(self.flat, starts, L, [(p1, nf + t1), (p2, nf + t2)], self.vocab)
        elif strategy == "CWR":
            a, b, p1, p2 = d.below(L), d.below(L), d.below(L + 1), d.below(L + 2)
            got = inserted(self.flat, starts, L, [(p1, starts + a), (p2, starts + b)])
        elif strategy == "RC":
            picks = np.stack([d.below(v) for _ in range(RC_TOKENS)], axis=1).ravel()
            offsets = pa.array(np.arange(0, RC_TOKENS * len(rows) + 1, RC_TOKENS, dtype=np.int32))
            got = _joined(pa.ListArray.from_arrays(offsets, self.vocab.take(pa.array(picks))))
            self._redo_equal(rows, got, L == RC_TOKENS)
        elif strategy == "RNA":
            p, number = d.below(L + 1), d.below(MAX_NUMBER + 1)
            numbers = pa.array(number).cast(pa.string())
            got = inserted(self.flat, starts, L, [(p, nf + np.arange(len(rows)))], numbers)
        else:
            raise ValueError(f"diversify.strategies: unknown strategy {strategy!r}")
        self.redo[rows[d.lost]] = True
        return _spread(got, rows, self.n)

    def _redo_equal(self, rows: np.ndarray, got, maybe: np.ndarray):
        """Rows whose alternative equals their stripped caption (possible only where ``maybe``):
        the per-row code draws again from the same generator."""
        captions, alts = self.captions.take(pa_indices(rows[maybe])).to_pylist(), got.filter(maybe).to_pylist()
        same = [c.strip() == a for c, a in zip(captions, alts, strict=True)]
        self.redo[rows[maybe][np.array(same, dtype=bool)]] = True

    def _mc(self):
        import pyarrow as pa
        import pyarrow.compute as pc

        out: list = [None] * self.n
        ids = list(self.pools)
        clustered = np.flatnonzero(pc.is_in(self.cluster_ids, value_set=pa.array(ids, pa.string())))
        cluster = mc_pools(self.pools)
        cids = self.cluster_ids.take(pa_indices(clustered)).to_pylist()
        own = [cluster[c] for c in cids]
        stripped = [c.strip() for c in self.captions.take(pa_indices(clustered)).to_pylist()]
        at = [index.get(c) for (_, index), c in zip(own, stripped, strict=True)]
        sizes = np.fromiter((len(p) - (a is not None) for (p, _), a in zip(own, at, strict=True)), np.int64, len(own))
        has = np.flatnonzero(sizes > 0)
        if has.size:
            d = self.draws("MC", clustered[has])
            for h, k in zip(has.tolist(), d.below(sizes[has]).tolist(), strict=True):
                a = at[h]
                out[int(clustered[h])] = own[h][0][k + (a is not None and k >= a)]
            self.redo[clustered[has][d.lost]] = True
        return pa.array(out, pa.string())


def pa_indices(rows: np.ndarray):
    import pyarrow as pa

    return pa.array(rows, pa.int64())


def _joined(lists):
    import pyarrow.compute as pc

    return pc.binary_join(lists, " ")


def _spread(values, rows: np.ndarray, n: int):
    """Values of some rows -> a length-n array with nulls elsewhere."""
    import pyarrow as pa

    if len(rows) == n:
        return values
    where = np.full(n, -1, dtype=np.int64)
    where[rows] = np.arange(len(rows))
    return values.take(pa.array(where, mask=where < 0))


def diversify_table(rows, pools: dict, vocab, cfg, seed: int):
    """A table of rows to diversify (key, shard, caption, cluster_id) and their clusters' MC
    captions (``pools``: cluster id -> ``cluster_captions``) -> their diversify/ rows with their
    shard (a table; None when no row gets an alternative): ``diversify_row`` of each row."""
    import pyarrow as pa

    from transforms.diversify import FALLBACK_VOCAB

    vocab = list(vocab) or list(FALLBACK_VOCAB)
    strategies = tuple(cfg.strategies)
    if not usable_vocabulary(vocab) or not rows.num_rows:
        redone = _per_row(rows, np.arange(rows.num_rows), pools, vocab, cfg, seed)
        return redone[0] if redone is not None else None
    state = _Rows(rows, pools, vocab, seed)
    columns = {s: state.column(s) for s in dict.fromkeys(strategies)}
    arrays = [columns[s] for s in strategies]
    n = rows.num_rows
    present = np.stack([a.is_valid().to_numpy(zero_copy_only=False) for a in arrays], axis=1)
    present &= np.cumsum(present, axis=1) <= cfg.n_alternatives
    redo = np.flatnonzero(state.redo)
    present[redo] = False
    counts = present.sum(axis=1)
    row, which = np.nonzero(present)  # row-major: each row's alternatives in strategy order
    index = which * n + row  # into the strategies' columns, concatenated
    names = list(dict.fromkeys(strategies))
    label = np.array([names.index(s) for s in strategies], dtype=np.int64)[which]
    extra = []
    if len(redo):  # rows the per-row code makes (a few): their alternatives spliced in at their rows
        at, extra_labels = [], []
        for i, d in zip(redo.tolist(), _per_row_dicts(rows, redo, pools, vocab, cfg, seed), strict=True):
            if d is not None:
                counts[i] = len(d["alternatives"])
                at += [i] * counts[i]
                extra += d["alternatives"]
                extra_labels += [names.index(s) for s in d["alternative_strategies"]]
        where = np.searchsorted(row, np.array(at, dtype=np.int64))
        index = np.insert(index, where, len(arrays) * n + np.arange(len(extra)))
        label = np.insert(label, where, np.array(extra_labels, dtype=np.int64))
    kept = np.flatnonzero(counts)
    if not len(kept):
        return None
    offsets = pa.array(np.concatenate([[0], np.cumsum(counts[kept])]).astype(np.int32))
    alts = pa.concat_arrays([*arrays, pa.array(extra, pa.string())]).take(pa_indices(index))
    labels = pa.array(names, pa.string()).take(pa_indices(label))
    taken = rows if len(kept) == n else rows.take(pa_indices(kept))
    return _table(taken, alts, labels, offsets, cfg)


def _table(taken, alts, labels, offsets, cfg):
    """Rows (key, caption, shard) and their alternatives and labels, flat with offsets -> a
    table of diversify/ rows with their shard."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from transforms.diversify import _with_shard

    schema = _with_shard()
    strategies = pa.ListArray.from_arrays(offsets, labels)
    columns = {
        "key": taken.column("key"),
        "caption": taken.column("caption"),
        "alternatives": pa.ListArray.from_arrays(offsets, alts),
        "strategy": pc.binary_join(strategies, ","),
        "alternative_strategies": strategies,
        "gaussian_noise_sigma": pa.array(np.full(taken.num_rows, cfg.gaussian_noise_sigma, dtype=np.float64)),
        "shard": taken.column("shard"),
    }
    return pa.table([columns[f.name].cast(f.type) for f in schema], schema=schema)


def _per_row(rows, which: np.ndarray, pools: dict, vocab: list[str], cfg, seed: int):
    """``diversify_row`` of the given rows, one at a time -> (a table of those that get an
    alternative, their positions in ``rows``), or None."""
    import pyarrow as pa

    from transforms.diversify import _with_shard

    dicts = _per_row_dicts(rows, which, pools, vocab, cfg, seed)
    got = [(i, d) for i, d in zip(which.tolist(), dicts, strict=True) if d]
    if not got:
        return None
    table = pa.Table.from_pylist([d for _, d in got], schema=_with_shard())
    return table, np.array([i for i, _ in got], dtype=np.int64)


def _per_row_dicts(rows, which: np.ndarray, pools: dict, vocab: list[str], cfg, seed: int) -> list:
    """``diversify_row`` of each given row (a dict, or None where no alternative applies)."""
    from transforms.diversify import diversify_row

    taken = rows.take(pa_indices(which)).to_pylist()
    return [diversify_row(row, pools.get(row["cluster_id"], []), vocab, cfg, seed) for row in taken]
