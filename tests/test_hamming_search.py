"""The integer in-cell search of packed codes (transforms/hamming_search.py) gives exactly what the
float search of +/-1 vectors (transforms/cell_search.search_cell) gives: pairs, similarities,
nearest neighbours and their ties."""

import numpy as np
import pytest

from transforms import cell_search, hamming_search
from transforms.phash import QUERY_ROWS, code_vectors, cosine_threshold


def _codes(m: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (m, 7, 32), dtype=np.uint8)
    codes[: m // 2, 6] = codes[: m // 2, 0]  # trimmed frame = frame: a repeated query row
    for k in range(0, m // 3, 3):  # copies a few bits off
        flips = (rng.random((7, 32)) < 0.03) * rng.integers(1, 256, (7, 32), dtype=np.uint8)
        codes[k + 1] = codes[k] ^ flips.astype(np.uint8)
    codes[m - 8 : m - 1] = codes[m - 9]  # exact repeats: nearest-neighbour ties -> the smaller index
    codes[m - 1, 3] = codes[5, 0]  # a match through a non-query row only
    codes[200, 6] = codes[260, 6]  # matches through the second query row (trimmed frame) only
    codes[205, 6] = codes[270, 0]
    codes[280, 6] = codes[210, 0]
    return codes


@pytest.mark.parametrize("tile", [512, 64, 37])
def test_same_as_the_float_search(tile):
    codes = _codes(300)
    threshold = cosine_threshold(64)
    got = hamming_search.search_codes(codes, QUERY_ROWS, threshold, tile=tile)
    want = cell_search.search_cell(code_vectors(codes), QUERY_ROWS, threshold, bf16=False)
    for name, a, b in zip(("i", "j", "sim", "nn", "nn_sim"), got, want, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert len(got[0]) > 50  # planted copies and repeats found
    pairs = set(zip(*got[:2], strict=True))
    assert (299, 5) not in pairs and {(5, 299), (200, 260), (205, 270), (210, 280)} <= pairs


def test_threshold_is_inclusive_and_ties_take_the_smaller_index():
    codes = np.zeros((4, 2, 32), dtype=np.uint8)
    codes[1, :, 0] = 0b00011111  # 5 bits from row 0 in both hashes
    codes[2, :, 0] = 0b00011111  # the same as 1: 0 bits from it
    codes[3] = 255
    i, j, sim, nn, nn_sim = hamming_search.search_codes(codes, (0,), cosine_threshold(5))
    assert list(zip(i, j, strict=True)) == [(0, 1), (0, 2), (1, 2)]
    assert list(sim) == pytest.approx([1 - 10 / 256, 1 - 10 / 256, 1.0])
    assert list(nn) == [1, 2, 1, 1]  # row 3: rows 1 and 2 tie (251 bits) -> 1
    i, j, *_ = hamming_search.search_codes(codes, (0,), cosine_threshold(4))
    assert list(zip(i, j, strict=True)) == [(1, 2)]


def test_two_rows_and_one_hash():
    codes = np.zeros((2, 1, 32), dtype=np.uint8)
    i, j, sim, nn, nn_sim = hamming_search.search_codes(codes, (0,), 0.5)
    assert (list(i), list(j), list(nn), list(nn_sim)) == ([0], [1], [1, 0], [1.0, 1.0])
