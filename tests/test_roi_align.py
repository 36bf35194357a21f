"""RoIAlign against torchvision.ops.roi_align's semantics (its wheel does not load against the CPU
torch here): a float64 transcription of its CPU kernel, exactness on linear feature maps, and
hand-computed values for boxes past the border."""

import math

import jax
import numpy as np
import pytest

from mmjax.models.roi_align import roi_align


def reference(features, boxes, out, scale, sampling_ratio, aligned):
    """torchvision's roi_align_kernel.cpp, loop for loop, in float64 (channels last)."""
    N, H, W, C = features.shape
    result = np.zeros((len(boxes), out, out, C))

    def bilinear(fm, y, x):
        if y < -1.0 or y > H or x < -1.0 or x > W:
            return np.zeros(C)
        y, x = max(y, 0.0), max(x, 0.0)
        y0, x0 = int(y), int(x)
        if y0 >= H - 1:
            y0 = y1 = H - 1
            y = float(y0)
        else:
            y1 = y0 + 1
        if x0 >= W - 1:
            x0 = x1 = W - 1
            x = float(x0)
        else:
            x1 = x0 + 1
        ly, lx = y - y0, x - x0
        return (
            (1 - ly) * (1 - lx) * fm[y0, x0]
            + (1 - ly) * lx * fm[y0, x1]
            + ly * (1 - lx) * fm[y1, x0]
            + ly * lx * fm[y1, x1]
        )

    for k, (b, x1, y1, x2, y2) in enumerate(boxes.astype(np.float64)):
        off = 0.5 if aligned else 0.0
        sw, sh, ew, eh = x1 * scale - off, y1 * scale - off, x2 * scale - off, y2 * scale - off
        w, h = ew - sw, eh - sh
        if not aligned:
            w, h = max(w, 1.0), max(h, 1.0)
        bh, bw = h / out, w / out
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(h / out)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(w / out)
        count = max(gh * gw, 1)
        for ph in range(out):
            for pw in range(out):
                acc = np.zeros(C)
                for iy in range(gh):
                    y = sh + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        acc += bilinear(features[int(b)], y, sw + pw * bw + (ix + 0.5) * bw / gw)
                result[k, ph, pw] = acc / count
    return result


def _boxes(rng, n, N, size):
    """Boxes of every kind: inside, tiny (under one pixel), past each border, reversed-free."""
    xy = rng.uniform(-0.3 * size, 1.2 * size, size=(n, 2, 2))
    lo, hi = xy.min(1), xy.max(1)
    hi[: n // 4] = lo[: n // 4] + rng.uniform(0, 0.8, size=(n // 4, 2))  # smaller than a pixel
    return np.concatenate([rng.integers(0, N, (n, 1)), lo, hi], 1).astype(np.float32)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_matches_torchvisions_kernel(aligned, sampling_ratio):
    rng = np.random.default_rng(sampling_ratio + 1 + 10 * aligned)
    features = rng.normal(size=(2, 9, 7, 3)).astype(np.float32)
    boxes = _boxes(rng, 24, 2, 16)  # input pixels, scale 0.5 onto the 9 x 7 map
    # boxes up to 1.5x the map: the adaptive grid's static bound must cover them (the default
    # covers boxes up to the map's size)
    got = roi_align(features, boxes, 3, 0.5, sampling_ratio, aligned, max_sampling_ratio=6)
    want = reference(features.astype(np.float64), boxes, 3, 0.5, sampling_ratio, aligned)
    assert got.shape == (24, 3, 3, 3)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
    inside = boxes[:, 1:].min(1) >= 0
    inside &= (boxes[:, [1, 3]].max(1) <= 14) & (boxes[:, [2, 4]].max(1) <= 18)  # within the map
    default = roi_align(features, boxes[inside], 3, 0.5, sampling_ratio, aligned)
    np.testing.assert_allclose(np.asarray(default), want[inside], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aligned", [False, True])
def test_exact_on_linear_feature_maps(aligned):
    """Bilinear sampling of a linear map is exact and the grid is symmetric within each bin, so a
    bin averages to the map's value at the bin's centre (boxes whose samples stay inside)."""
    H, W = 12, 10
    a, b, c = np.array([0.5, -2.0]), np.array([1.5, 0.25]), np.array([3.0, -1.0])
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    fmap = (yy[..., None] * a + xx[..., None] * b + c)[None].astype(np.float32)
    rng = np.random.default_rng(0)
    lo = rng.uniform(1.0, 4.0, size=(16, 2))
    hi = lo + rng.uniform(1.0, 4.5, size=(16, 2))
    boxes = np.concatenate([np.zeros((16, 1)), lo, hi], 1).astype(np.float32)  # (x1, y1), (x2, y2)
    for ratio in (-1, 2, 5):
        out = np.asarray(roi_align(fmap, boxes, (2, 3), 1.0, ratio, aligned))
        off = 0.5 if aligned else 0.0
        for k, (_, x1, y1, x2, y2) in enumerate(boxes - np.array([0, off, off, off, off], np.float32)):
            cy = y1 + (np.arange(2) + 0.5) * (y2 - y1) / 2
            cx = x1 + (np.arange(3) + 0.5) * (x2 - x1) / 3
            want = cy[:, None, None] * a + cx[None, :, None] * b + c
            np.testing.assert_allclose(out[k], want, atol=1e-4)


def test_boxes_past_the_border_by_hand():
    """f(y, x) = x + 10 on a 4 x 4 map, one bin, unaligned."""
    fmap = (np.arange(4)[None, :, None] + 10.0).repeat(4, 0)[None].astype(np.float32)  # [1, 4, 4, 1]
    boxes = np.array(
        [
            [0, 3, 0, 7, 4],  # 2 x 2 samples at x = 4 (on the edge: reads column 3) and x = 6 (out: 0)
            [0, -2, 0, 1, 4],  # 1 sample at x = -0.5: in [-1, 0), reads column 0
            [0, -6, 0, -2, 4],  # every sample left of -1: zeros
        ],
        np.float32,
    )
    got = np.asarray(roi_align(fmap, boxes[:1], 1, 1.0, 2))[:, 0, 0, 0].tolist()
    got += np.asarray(roi_align(fmap, boxes[1:], 1, 1.0, 1))[:, 0, 0, 0].tolist()
    assert got == pytest.approx([(13 + 0 + 13 + 0) / 4, 10.0, 0.0])


def test_gradients_reach_the_features():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(1, 6, 6, 2)).astype(np.float32)
    boxes = np.array([[0, 1, 1, 4, 5]], np.float32)
    g = jax.grad(lambda f: roi_align(f, boxes, 2, 1.0, 2, True).sum())(features)
    assert np.isclose(np.asarray(g).sum(), 2 * 2 * 2)  # each output sums bilinear weights that sum to 1
    assert (np.asarray(g)[0, 5] == 0).all()  # the last row is never sampled


def test_per_image_boxes_stay_on_their_shard():
    """per_image (box n on image n, MM-GEM's regions) gives the gathered path's values, and on a
    batch-sharded feature map it compiles without an all-gather (the gathered path needs one)."""
    rng = np.random.default_rng(2)
    features = rng.normal(size=(8, 9, 7, 3)).astype(np.float32)
    boxes = _boxes(rng, 8, 8, 16)
    boxes[:, 0] = np.arange(8)
    got = roi_align(features, boxes[:, 1:], 3, 0.5, -1, True, per_image=True)
    np.testing.assert_allclose(got, roi_align(features, boxes, 3, 0.5, -1, True), rtol=1e-6, atol=1e-6)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    f = jax.device_put(features, rows)

    def hlo(fn, b):
        return jax.jit(fn, out_shardings=rows).lower(f, jax.device_put(b, rows)).compile().as_text()

    per_image = hlo(lambda f, b: roi_align(f, b, 3, 0.5, -1, True, per_image=True), boxes[:, 1:])
    gathered = hlo(lambda f, b: roi_align(f, b, 3, 0.5, -1, True), boxes)
    assert "all-gather" not in per_image and "all-gather" in gathered
