"""The cell search's plan: a bounded, order-independent sample of rows, spherical k-means centroids
trained on it, and the assignment of every row to its cell(s).

``SampleRows`` (a CombineFn) keeps the rows of smallest key priority, whatever the arrival order;
``make_plan`` trains the centroids on that sample (the plan is the search's only side input);
``assign`` places rows: the cell of the centroid nearest to each query vector, and the
second-nearest one too when it is within ``margin`` of the first. Products are bf16 where the CPU
has native bf16, with an fp32 re-ranking of every row whose choice could differ, so the cells are
fp32's. The search inside cells: ``transforms.cell_search``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from transforms.cell_products import SHAPE_STEP
from transforms.row_blobs import rows_of

# Idle OpenMP threads sleep instead of spinning (set before torch loads libgomp; a user's setting
# wins). On a worker whose cores are shared, spinning threads waiting for a descheduled peer
# burned 5x the CPU of the work itself in the in-cell products (2 cores, load 8).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

BF16_EPS = 2.0**-6  # |bf16 product - fp32 product| bound for unit vectors (inputs and output rounded)
KMEANS_BLOCK = 32768  # sample rows per k-means product (a row's products do not depend on it)
SAMPLE_PER_CELL = 40  # k-means sample rows per cell, unless the settings give a sample size
ASSIGN_ROWS = 4096  # rows an ``assign`` step: its products stay in cache (1M rows: ~35% less CPU than 32,768)


@functools.cache
def bf16_native() -> bool:
    """True where the CPU multiplies bf16 natively (avx512_bf16 or AMX); MEMSIEVE_BF16=0/1 overrides."""
    forced = os.environ.get("MEMSIEVE_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True)
class Plan:
    """What every worker needs to place rows: the only side input of the search."""

    centroids: np.ndarray | None  # (k, d) float32, None = one cell
    groups: int  # cells travel in this many shuffle keys
    margin: float  # second cell when its centroid is within this (cosine) of the first
    second: bool  # at most one second cell per query row (top_m >= 2)

    @property
    def cells(self) -> int:
        return 1 if self.centroids is None else len(self.centroids)


def key_priority(keys, seed: int) -> np.ndarray:
    """A stable pseudo-random uint64 per key (sampling that does not depend on arrival order):
    pandas' SipHash of the UTF-8 bytes. ``categorize=False``: the same values for string keys
    (pandas' default factorizes first and hashes each distinct string once, the same hash), at a
    sixth of the cost (1M keys: 0.42 -> 0.08 CPU-s)."""
    import pandas as pd

    return pd.util.hash_array(
        np.asarray(keys, dtype=object), hash_key=f"memsieve{seed:08d}"[:16], categorize=False
    ).astype(np.uint64)


def choose_cells(n: int, single_cell_below: int, requested: int = 0) -> int:
    """Cells: one (exact) up to ``single_cell_below`` rows, else 1.2 sqrt(n), >= 50 rows a cell.

    Cost: assigning rows is n k bf16 products (and a top-k pass), in-cell search w n^2 / k bf16
    products (the full square of each cell, and a top-k pass; w ~ 1.2-1.5 from uneven cell
    sizes and second cells); their sum is smallest near k = sqrt(w n). Measured on 1M x 512
    LAION-layout rows (scripts/bench_cells.py): 1,200 cells 14% faster than 750, same recall."""
    if requested:
        return max(1, min(requested, n))
    if n <= single_cell_below:
        return 1
    return int(max(1, min(n // 50, round(1.2 * np.sqrt(n)))))


def training_rows(k: int, sample_size: int = 0) -> int:
    """Query vectors of the sample that k-means trains on (the sample's first ones)."""
    return sample_size or SAMPLE_PER_CELL * k


def make_plan(
    n: int,
    sample: np.ndarray,
    *,
    single_cell_below: int = 20_000,
    requested_cells: int = 0,
    sample_size: int = 0,
    margin: float = 0.02,
    top_m: int = 2,
    target_group_rows: int = 200_000,
    min_groups: int = 1,
    seed: int = 0,
) -> Plan:
    """n rows and a query-vector sample (already in a fixed order) -> centroids and shuffle groups."""
    k = choose_cells(n, single_cell_below, requested_cells)
    if k <= 1 or len(sample) < 2:
        return Plan(None, 1, margin, top_m >= 2)
    take = sample[: training_rows(k, sample_size)]
    centroids = train_centroids(take, k, seed, bf16=bf16_native())
    groups = int(min(len(centroids), max(min_groups, -(-n // max(1, target_group_rows)))))
    return Plan(centroids.astype(np.float32), groups, margin, top_m >= 2)


def train_centroids(sample: np.ndarray, k: int, seed: int, niter: int = 8, bf16: bool = False) -> np.ndarray:
    """``transforms.ann.train_centroids``, bit for bit (tests/test_cell_plan.py), at less cost:
    the sample is cast to bf16 once, not once an iteration; the products land in one buffer
    reused by every block and iteration (a fresh 100 MB array a block cost more in page faults
    than its argmax); each row's nearest centre is numpy's argmax of the float32 image of the
    products (torch's argmax of bf16 on a CPU costs as much as the product). Both take the first
    of equal maxima. bf16 products: numpy's argmax of their bits as int16 (``_bf16_argmax``)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    x = torch.nn.functional.normalize(x, dim=1)
    k = max(1, min(k, len(x)))
    gen = torch.Generator().manual_seed(seed)
    centres = x[torch.randperm(len(x), generator=gen)[:k]].clone()
    starts = range(0, len(x), KMEANS_BLOCK)
    blocks = [x[s : s + KMEANS_BLOCK] for s in starts]
    low = [b.to(torch.bfloat16) for b in blocks] if bf16 else blocks
    rows = min(len(x), KMEANS_BLOCK)
    prod = torch.empty((rows, k), dtype=torch.bfloat16 if bf16 else torch.float32)
    nearest = np.empty(len(x), dtype=np.int64)
    with torch.inference_mode():
        for _ in range(niter):
            c = centres.T.to(torch.bfloat16) if bf16 else centres.T
            for s, b in zip(starts, low, strict=True):
                torch.mm(b, c, out=prod[: len(b)])
                if bf16:
                    nearest[s : s + len(b)] = _bf16_argmax(prod[: len(b)])
                else:
                    nearest[s : s + len(b)] = prod[: len(b)].numpy().argmax(axis=1)
            assign = torch.from_numpy(nearest)
            sums = torch.zeros_like(centres).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k)
            filled = counts > 0
            centres[filled] = torch.nn.functional.normalize(sums[filled], dim=1)
    return centres.numpy()


def _bf16_argmax(prod) -> np.ndarray:
    """Each row's first maximum of a bf16 tensor, as numpy's argmax of its float32 image gives it:
    the argmax of the bits read as int16 (half the bytes, no cast). Positive bf16 values order as
    their bits do, and every negative value or -0 reads below them; a row whose largest value is
    not a positive finite number (none, in practice) is taken from the float32 image."""
    import torch

    bits = prod.view(torch.int16).numpy()
    best = bits.argmax(axis=1)
    top = bits[np.arange(len(bits)), best]
    odd = np.flatnonzero((top <= 0) | (top >= 0x7F80))  # +-0 or all negative; inf or NaN
    if len(odd):
        best[odd] = prod[torch.from_numpy(odd)].float().numpy().argmax(axis=1)
    return best


def assign(queries: np.ndarray, plan: Plan, batch: int = ASSIGN_ROWS) -> np.ndarray:
    """(m, Q, d) query vectors (float16 or float32) -> (m, C) int32 cell ids per row, -1 padded,
    unique, ascending. float16 rows go to bf16 directly (the same values as through float32)."""
    import torch

    m, nq = queries.shape[:2]
    if plan.centroids is None:
        return np.zeros((m, 1), dtype=np.int32)
    per = 2 if plan.second and len(plan.centroids) > 1 else 1
    cells = np.full((m, nq * per), -1, dtype=np.int32)
    flat = queries.reshape(m * nq, -1)
    if flat.dtype not in (np.float16, np.float32):
        flat = flat.astype(np.float32)
    low = bf16_native() and len(plan.centroids) > per + 2
    c32, ct, ct_low, c_norm = _centroid_tensors(plan.centroids, low)
    with torch.inference_mode():
        for s in range(0, len(flat), batch):
            x = _tensor(np.ascontiguousarray(flat[s : s + batch]))
            if low:
                values, ids = _nearest_centroids(x, ct_low, c32, c_norm, per, plan.margin)
            else:
                values, ids = torch.topk(x.float() @ ct, per, dim=1)
            ids = ids.numpy().astype(np.int32)
            if per == 2:
                near = (values[:, 0] - values[:, 1]).numpy() <= plan.margin
                ids[~near, 1] = -1
            cells.reshape(m * nq, per)[s : s + len(x)] = ids
    cells.sort(axis=1)
    cells[:, 1:][cells[:, 1:] == cells[:, :-1]] = -1  # repeated cells of one row
    cells.sort(axis=1)
    return cells[:, ::-1].copy()  # the valid ids first (descending), -1 last


_CENTROIDS: list = []  # [(centroids, low) -> tensors] of the last plan: the same for every batch


def _centroid_tensors(centroids: np.ndarray, low: bool) -> tuple:
    """-> (float32 centroids, their transpose, it in bf16 where ``low``, the largest centroid
    norm), made once per plan, not once per assigned batch."""
    import torch

    last = _CENTROIDS[0] if _CENTROIDS else None  # read once: another stage's thread may replace it
    if last is not None and last[0] is centroids and last[1] == low:
        return last[2]
    c32 = torch.from_numpy(centroids)
    ct = c32.T.contiguous()
    made = (c32, ct, ct.to(torch.bfloat16) if low else ct, float(torch.linalg.vector_norm(c32, dim=1).max()))
    _CENTROIDS[:] = [(centroids, low, made)]
    return made


def _tensor(x: np.ndarray):
    """torch.from_numpy, also of the read-only views ``row_blobs.unpack`` gives (only read here)."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(x)


def _nearest_centroids(x, ct_low, c32, c_norm: float, per: int, margin: float):
    """bf16 products -> (values, ids) of each row's ``per`` nearest centroids. A row whose first
    two are within ``margin`` plus twice the bf16 error (its order or second cell could differ in
    fp32) is ranked again in fp32 among its bf16 top per + 2; the others' bf16 choice is fp32's.
    The first two come from two reductions of the bits (``_first_two``: a sixth of a top-k's
    cost); the top-k only for rows that need it (a row's does not depend on the others). A sure
    row's second id (its first, repeated) is dropped by ``assign``: not within the margin."""
    import torch

    n = len(x)
    low = torch.empty((n + -n % SHAPE_STEP, x.shape[1]), dtype=torch.bfloat16)
    low[:n], low[n:] = x, 0  # zero rows up to a multiple: the product reuses a kernel (cell_products)
    prod = (low @ ct_low)[:n]
    eps = BF16_EPS * float(torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).max()) * c_norm
    limit = (margin if per == 2 else 0.0) + 2 * eps
    first, values, odd = _first_two(prod)
    redo = torch.nonzero(((values[:, 0] - values[:, 1]) <= limit) | odd)[:, 0]
    values, ids = values[:, :per].clone(), first[:, None].repeat(1, per)
    if not len(redo):
        return values, ids
    top = torch.topk(prod[redo], per + 2, dim=1)  # as over the whole batch, for these rows
    near, short = top.values.float(), top.indices
    values[redo], ids[redo] = near[:, :per], short[:, :per]
    unsure = torch.nonzero(near[:, 0] - near[:, 1] <= limit)[:, 0]
    if len(unsure):
        rows = redo[unsure]
        exact = torch.bmm(c32[short[unsure]], x[rows].float()[:, :, None])[:, :, 0]
        best = torch.topk(exact, per, dim=1)
        values[rows], ids[rows] = best.values, torch.gather(short[unsure], 1, best.indices)
    return values, ids


def _first_two(prod) -> tuple:
    """bf16 products (n, k), k >= 2 -> (each row's first maximum's index, its (largest, second
    largest) values as float32 (n, 2), rows whose bits do not order as their values: a largest
    or second value that is not a positive finite number). Positive bf16 values order as their
    bits read as int16 (``_bf16_argmax``); the second is the largest once the first is masked."""
    import torch

    bits = prod.view(torch.int16).numpy()
    rows, best = np.arange(len(bits)), bits.argmax(axis=1)
    top = bits[rows, best]
    bits[rows, best] = np.iinfo(np.int16).min  # masked for the second, then put back
    second, bits[rows, best] = bits.max(axis=1), top
    two = np.stack([top, second], axis=1)
    odd = ((two <= 0) | (two >= 0x7F80)).any(axis=1)
    values = (two.astype(np.int32) << 16).view(np.float32)
    return torch.from_numpy(best), torch.from_numpy(values), torch.from_numpy(odd)


def groups_of(cells: np.ndarray, groups: int) -> np.ndarray:
    """Shuffle group of each cell id (-1 stays -1)."""
    return np.where(cells >= 0, cells % groups, -1)


def sample_rows(keys, n_cap: int, seed: int) -> np.ndarray:
    """Row indices of the ``n_cap`` keys of smallest priority, in priority order."""
    prio = key_priority(keys, seed)
    return np.argsort(prio, kind="stable")[:n_cap]


def _smallest(prio: np.ndarray, keys: np.ndarray, cap: int) -> np.ndarray:
    """Indices of the ``cap`` rows of smallest (priority, key), in that order."""
    if len(prio) > cap:  # only rows at or below the cap-th priority can be chosen
        cand = np.flatnonzero(prio <= np.partition(prio, cap - 1)[cap - 1])
    else:
        cand = np.arange(len(prio))
    order = cand[np.argsort(prio[cand], kind="stable")]
    if (prio[order][1:] == prio[order][:-1]).any():  # equal priorities (a repeated key): by key too
        order = cand[np.lexsort((keys[cand], prio[cand]))]
    return order[:cap]


class _Held:
    """A ``SampleRows`` accumulator: rows seen, the bound, and the held rows: priorities and keys
    in chunks, payload rows in one buffer of 2 x cap rows filled and compacted in place. Fresh
    arrays per batch and per compaction (~0.8 GB at 1M x 512, the page faults of which cost
    more than the copies on a busy VM) become one buffer; pickled, it keeps only its rows."""

    def __init__(self):
        self.n, self.bound, self.prio, self.keys, self.rows, self.fill = 0, np.iinfo(np.uint64).max, [], [], None, 0

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.rows is not None:
            state["rows"] = self.rows[: self.fill]
        return state

    def add(self, prio: np.ndarray, keys: np.ndarray, payload: np.ndarray, take: np.ndarray, cap: int) -> None:
        """Rows ``take`` (ascending) of a batch; compacts to ``cap`` rows first when the buffer is full."""
        if self.fill + len(take) > 2 * cap:
            self.compact(cap)
        if self.rows is None or len(self.rows) < self.fill + len(take):
            grown = np.empty((max(2 * cap, self.fill + len(take)), *payload.shape[1:]), dtype=payload.dtype)
            if self.fill:
                grown[: self.fill] = self.rows[: self.fill]
            self.rows = grown
        out = self.rows[self.fill : self.fill + len(take)]
        if payload.dtype == out.dtype:
            np.take(payload, take, axis=0, out=out, mode="clip")  # no buffering: indices are valid
        else:
            out[...] = payload[take]
        self.prio.append(prio[take])
        self.keys.append(keys[take])
        self.fill += len(take)

    def held(self) -> tuple:
        if len(self.prio) > 1:
            self.prio, self.keys = [np.concatenate(self.prio)], [np.concatenate(self.keys)]
        return (self.prio[0], self.keys[0]) if self.prio else (np.empty(0, np.uint64), np.empty(0, str))

    def compact(self, cap: int) -> None:
        """Keep the ``cap`` rows of smallest (priority, key), in their order in the buffer (moved
        forward in place: a row's new place is never after its old one); tighten the bound."""
        prio, keys = self.held()
        if self.fill <= cap:
            return
        take = np.sort(_smallest(prio, keys, cap))
        for s in range(0, len(take), 4096):  # blocks: each reads rows at or after the rows it writes
            block = take[s : s + 4096]
            self.rows[s : s + len(block)] = self.rows[block]
        self.prio, self.keys, self.fill = [prio[take]], [keys[take]], len(take)
        if len(take) == cap:
            self.bound = min(self.bound, self.prio[0].max())


class SampleRows(beam.CombineFn):
    """Batches -> (row count, the ``cap`` rows of smallest key priority): order-independent.

    The accumulator (``_Held``) keeps up to twice the cap rows; once ``cap`` rows are held, a row
    above the bound (the cap-th smallest priority held) can never be chosen and is dropped on
    arrival; the held rows are compacted to the cap only when the buffer is full: no copy of the
    whole sample per input batch."""

    def __init__(self, cap: int, seed: int):
        self.cap, self.seed = cap, seed

    def create_accumulator(self):
        return _Held()

    def add_input(self, acc, batch):
        keys, payload = rows_of(batch)[:2]
        prio = key_priority(keys, self.seed)
        self._add(acc, prio, np.asarray(keys), payload)
        acc.n += len(keys)
        return acc

    def _add(self, acc: _Held, prio, keys, payload) -> None:
        take = np.flatnonzero(prio <= acc.bound)
        if len(take) > self.cap:
            take = np.sort(take[_smallest(prio[take], keys[take], self.cap)])
        if len(take):
            acc.add(prio, keys, payload, take, self.cap)

    def merge_accumulators(self, accs):
        accs = list(accs)
        out = accs[0]
        for a in accs[1:]:
            out.n += a.n
            out.bound = min(out.bound, a.bound)
            if a.fill:
                self._add(out, *a.held(), a.rows[: a.fill])
        return out

    def compact(self, acc):
        """Before an accumulator is sent on: the ``cap`` rows that can still be chosen, not 2 x cap."""
        acc.compact(self.cap)
        return acc

    def extract_output(self, acc):
        if not acc.fill:
            return acc.n, None
        prio, keys = acc.held()
        return acc.n, acc.rows[_smallest(prio, keys, self.cap)]
