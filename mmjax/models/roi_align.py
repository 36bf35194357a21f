"""RoIAlign with torchvision.ops.roi_align's semantics, jittable (MM-GEM's region features).

Boxes [K, 5] are (batch index, x1, y1, x2, y2) in input pixels; times `spatial_scale` they are
feature-map coordinates, shifted by -0.5 when `aligned` (pixel centres; without it a box is at
least 1 x 1). Each of the output_size bins averages a grid of bilinear samples:
`sampling_ratio` per side, or ceil(box side / output side) when <= 0. A sample outside
[-1, size] contributes 0 but is counted in the average; one in [-1, 0) reads the border.

Under jit the adaptive grid needs a static bound: `max_sampling_ratio` (default: the grid of a
box as large as the feature map, +1). A box larger than that is sampled with the bound instead
of torchvision's finer grid.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def _bilinear(fmap: jax.Array, y: jax.Array, x: jax.Array) -> jax.Array:
    """fmap [H, W, C] at float positions y, x (same shape S) -> [*S, C], torchvision's rule."""
    H, W = fmap.shape[:2]
    inside = (y >= -1.0) & (y <= H) & (x >= -1.0) & (x <= W)
    y, x = jnp.maximum(y, 0.0), jnp.maximum(x, 0.0)
    y0, x0 = jnp.floor(y).astype(jnp.int32), jnp.floor(x).astype(jnp.int32)
    y_edge, x_edge = y0 >= H - 1, x0 >= W - 1
    y0, x0 = jnp.where(y_edge, H - 1, y0), jnp.where(x_edge, W - 1, x0)
    y1, x1 = jnp.where(y_edge, H - 1, y0 + 1), jnp.where(x_edge, W - 1, x0 + 1)
    ly = jnp.where(y_edge, 0.0, y - y0)[..., None]
    lx = jnp.where(x_edge, 0.0, x - x0)[..., None]
    v = (
        (1 - ly) * (1 - lx) * fmap[y0, x0]
        + (1 - ly) * lx * fmap[y0, x1]
        + ly * (1 - lx) * fmap[y1, x0]
        + ly * lx * fmap[y1, x1]
    )
    return jnp.where(inside[..., None], v, 0.0)


def _grid_bound(H: int, W: int, out_h: int, out_w: int, sampling_ratio: int, max_sampling_ratio) -> tuple:
    if sampling_ratio > 0:
        return int(sampling_ratio), int(sampling_ratio)
    if max_sampling_ratio:
        return int(max_sampling_ratio), int(max_sampling_ratio)
    return math.ceil((H + 1) / out_h), math.ceil((W + 1) / out_w)


def _one(fmap, box, out_h, out_w, spatial_scale, sampling_ratio, aligned, gh_max, gw_max):
    """fmap [H, W, C], box [4] (x1, y1, x2, y2) -> [out_h, out_w, C]."""
    x1, y1, x2, y2 = box * spatial_scale - (0.5 if aligned else 0.0)
    w, h = x2 - x1, y2 - y1
    if not aligned:
        w, h = jnp.maximum(w, 1.0), jnp.maximum(h, 1.0)
    bin_h, bin_w = h / out_h, w / out_w
    if sampling_ratio > 0:
        gh = gw = jnp.float32(sampling_ratio)
    else:
        gh = jnp.clip(jnp.ceil(h / out_h), 1, gh_max)
        gw = jnp.clip(jnp.ceil(w / out_w), 1, gw_max)
    iy, ix = jnp.arange(gh_max), jnp.arange(gw_max)
    # sample (ph, iy) of bin row ph: y1 + ph * bin_h + (iy + 0.5) * bin_h / gh, for iy < gh
    ys = y1 + jnp.arange(out_h)[:, None] * bin_h + (iy[None] + 0.5) * bin_h / gh  # [out_h, gh_max]
    xs = x1 + jnp.arange(out_w)[:, None] * bin_w + (ix[None] + 0.5) * bin_w / gw  # [out_w, gw_max]
    y = jnp.broadcast_to(ys[:, None, :, None], (out_h, out_w, gh_max, gw_max))
    x = jnp.broadcast_to(xs[None, :, None, :], (out_h, out_w, gh_max, gw_max))
    v = _bilinear(fmap, y, x)  # [out_h, out_w, gh_max, gw_max, C]
    used = (iy[:, None] < gh) & (ix[None, :] < gw)
    total = jnp.where(used[None, None, :, :, None], v, 0.0).sum((2, 3))
    return total / jnp.maximum(gh * gw, 1.0)


@functools.partial(
    jax.jit,
    static_argnames=(
        "output_size",
        "spatial_scale",
        "sampling_ratio",
        "aligned",
        "max_sampling_ratio",
        "per_image",
    ),
)
def roi_align(
    features: jax.Array,
    boxes: jax.Array,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    max_sampling_ratio: int | None = None,
    per_image: bool = False,
) -> jax.Array:
    """features [N, H, W, C], boxes [K, 5] -> [K, out_h, out_w, C] (channels last).

    `per_image`: boxes [N, 4] without the batch index, box n on image n: no gather across the
    batch, so a batch-sharded feature map stays sharded (a gathered one is all-gathered first)."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    features = jnp.asarray(features)
    _, H, W, _ = features.shape
    bound = _grid_bound(H, W, out_h, out_w, sampling_ratio, max_sampling_ratio)
    one = functools.partial(
        _one, out_h=out_h, out_w=out_w, spatial_scale=spatial_scale, sampling_ratio=sampling_ratio,
        aligned=aligned, gh_max=bound[0], gw_max=bound[1],
    )  # fmt: skip
    boxes = boxes.astype(jnp.float32)
    if per_image:
        out = jax.vmap(one)(features, boxes)
    else:
        out = jax.vmap(lambda box: one(features[box[0].astype(jnp.int32)], box[1:]))(boxes)
    return out.astype(features.dtype)
