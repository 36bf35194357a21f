"""Rotary position embeddings (RoPE) with the Hugging Face scaling variants.

`rope_scaling` is None or a dict as in an HF config (`rope_type` or the older `type`):
  linear   factor                                           positions / factor
  dynamic  factor, original_max_position_embeddings          NTK base grows once max(positions) + 1 exceeds
                                                              the original length (per forward call, as HF)
  llama3   factor, low_freq_factor, high_freq_factor,        Llama 3.1 band-wise interpolation
           original_max_position_embeddings
  yarn     factor, original_max_position_embeddings,          YaRN ramp + attention (cos/sin) scaling
           beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate
Layout is HF's "rotate half": the two halves of each head vector form the rotated pairs.
"""

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

ROPE_TYPES = ('default', 'linear', 'dynamic', 'llama3', 'yarn')


def rope_type(scaling: Mapping | None) -> str:
    kind = 'default' if not scaling else scaling.get('rope_type', scaling.get('type', 'default'))
    if kind not in ROPE_TYPES:
        raise ValueError(f'rope type {kind!r} is not supported; supported: {", ".join(ROPE_TYPES)}')
    return kind


def _llama3(inv_freq: np.ndarray, s: Mapping) -> np.ndarray:
    factor, low, high = s['factor'], s['low_freq_factor'], s['high_freq_factor']
    old_len = s['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)


def _yarn(dim: int, theta: float, s: Mapping) -> tuple[np.ndarray, float]:
    factor, old_len = s['factor'], s['original_max_position_embeddings']
    mscale = lambda scale, m=1.0: 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0  # noqa: E731
    attention = s.get('attention_factor')
    if attention is None:
        if s.get('mscale') and s.get('mscale_all_dim'):
            attention = mscale(factor, s['mscale']) / mscale(factor, s['mscale_all_dim'])
        else:
            attention = mscale(factor)
    correction = lambda rot: dim * math.log(old_len / (rot * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
    low, high = correction(s.get('beta_fast') or 32), correction(s.get('beta_slow') or 1)
    if s.get('truncate', True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


def inv_frequencies(
    head_dim: int, theta: float, scaling: Mapping | None, seq_len: jax.Array | None = None
) -> tuple[jax.Array, float]:
    """(inverse frequencies [head_dim // 2] float32, cos/sin scale). `seq_len` (traced ok) is only
    read by 'dynamic': max(positions) + 1 of the current call."""
    kind = rope_type(scaling)
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / head_dim
    if kind == 'dynamic':
        factor, old_len = scaling['factor'], scaling['original_max_position_embeddings']
        length = old_len if seq_len is None else jnp.maximum(seq_len, old_len).astype(jnp.float32)
        base = theta * (factor * length / old_len - (factor - 1)) ** (head_dim / (head_dim - 2))
        return 1.0 / base ** jnp.asarray(exponents), 1.0
    inv_freq = 1.0 / theta**exponents
    if kind == 'linear':
        inv_freq = inv_freq / scaling['factor']
    elif kind == 'llama3':
        inv_freq = _llama3(inv_freq, scaling)
    elif kind == 'yarn':
        inv_freq, scale = _yarn(head_dim, theta, scaling)
        return jnp.asarray(inv_freq, jnp.float32), scale
    return jnp.asarray(inv_freq, jnp.float32), 1.0


def cos_sin(
    positions: jax.Array, head_dim: int, theta: float, scaling: Mapping | None = None
) -> tuple[jax.Array, jax.Array]:
    """positions [B, T] (int) -> cos, sin [B, T, head_dim] float32."""
    inv_freq, scale = inv_frequencies(head_dim, theta, scaling, jnp.max(positions) + 1)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, T, heads, head_dim] rotated by cos/sin [B, T, head_dim] (computed in x's dtype, as HF)."""
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin
