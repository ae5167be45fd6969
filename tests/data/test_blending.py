import time

import numpy as np
import pytest

from megatron_phi4.data.blending import (
    BlendedDataset, blend_counts, blend_range, build_blending_indices, normalize_weights)


def test_proportions_within_0p1_percent_at_every_1000_prefix():
    w = [0.5, 0.3, 0.2]
    n = 200_000
    di, si = build_blending_indices(w, n)
    for d, wd in enumerate(w):
        counts = np.cumsum(di == d)
        prefixes = np.arange(1000, n + 1, 1000)
        frac = counts[prefixes - 1] / prefixes
        assert np.abs(frac - wd).max() <= 0.001 + 1e-12
        # and the count never drifts more than one sample from w*n at any prefix
        assert np.abs(counts - wd * np.arange(1, n + 1)).max() <= 1.0
        # within-dataset indices are 0, 1, 2, ... in order
        np.testing.assert_array_equal(si[di == d], np.arange((di == d).sum()))


def test_chunking_does_not_change_the_stream():
    w = [3, 1, 0.7, 0.01]
    full = build_blending_indices(w, 50_000, chunk=50_000)
    small = build_blending_indices(w, 50_000, chunk=977)
    np.testing.assert_array_equal(full[0], small[0])
    np.testing.assert_array_equal(full[1], small[1])
    for a, b in [(0, 1), (123, 4567), (49_990, 50_000), (7, 7)]:
        d, k = blend_range(w, a, b)
        np.testing.assert_array_equal(d, full[0][a:b])
        np.testing.assert_array_equal(k, full[1][a:b])


def test_counts_match_index():
    w = [0.6, 0.25, 0.15]
    di, _ = build_blending_indices(w, 12_345)
    for n in (0, 1, 2, 999, 12_345):
        np.testing.assert_array_equal(blend_counts(w, n), np.bincount(di[:n], minlength=3))


def test_far_offsets_without_materializing():
    w = [0.5, 0.3, 0.2]
    start = 2_400_000_000  # Phi-4 scale: 10T tokens / 4096
    d, k = blend_range(w, start, start + 1000)
    c = blend_counts(w, start)
    assert np.all(np.abs(c - np.array(w) * start) <= 1)
    for ds in range(3):
        ks = k[d == ds]
        np.testing.assert_array_equal(ks, np.arange(c[ds], c[ds] + len(ks)))


def test_ten_million_in_seconds():
    t = time.perf_counter()
    di, si = build_blending_indices([0.15, 0.15, 0.40, 0.20, 0.10], 10_000_000)
    assert time.perf_counter() - t < 10
    assert len(di) == 10_000_000


def test_weights_validation():
    with pytest.raises(ValueError):
        normalize_weights([])
    with pytest.raises(ValueError):
        normalize_weights([1, -1])
    with pytest.raises(ValueError):
        normalize_weights([0, 0])
    # a zero weight gets nothing
    di, _ = build_blending_indices([1, 0, 1], 1000)
    assert (di == 1).sum() == 0


def test_blended_dataset_lookup_and_size_check():
    a = [("a", i) for i in range(100)]
    b = [("b", i) for i in range(100)]
    ds = BlendedDataset([a, b], [0.75, 0.25], 120, chunk=16)
    items = [ds[i] for i in range(120)]
    assert [x for x in items if x[0] == "a"] == [("a", i) for i in range(90)]
    assert [x for x in items if x[0] == "b"] == [("b", i) for i in range(30)]
    with pytest.raises(IndexError):
        ds[120]
    with pytest.raises(ValueError, match="needs"):
        BlendedDataset([a, b[:10]], [0.75, 0.25], 120)
