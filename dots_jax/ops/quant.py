"""Weight-only int8: symmetric quantisation with one f32 scale per output channel, and the projection that reads it.

    quantize_int8(w, reduce_axes) -> (q int8, scale f32)   scale = max|w| over reduce_axes / 127 (1 for an all-zero
                                                            channel), q = clip(round(w / scale), -127, 127)
    dequantize(q, scale, reduce_axes, dtype)               q * scale, the scale broadcast back over reduce_axes
    qeinsum(equation, x, w, scale)                         einsum(equation, x, w) for a float w, or for an int8 w
                                                            with its scale

reduce_axes are the weight's contracted (input) axes, so the scale has the weight's output axes, in order: q_proj
[H, N, D] -> scale [N, D], o_proj [N, D, H] -> [H], an MLP's [H, I] -> [I], experts [E, H, I] -> [E, I]. Because
every output channel has its own scale, the scale can be applied to the product's output instead of the weight:
x @ (q * s) = (x @ q) * s. qeinsum does that, so the contraction reads int8 bytes and multiplies the scale into
n outputs instead of k * n weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dots_jax.ops.common import round_to

__all__ = ["dequantize", "qeinsum", "quantize_int8", "scale_labels"]

INT8_MAX = 127  # symmetric: -128 is never used, so that negating a weight never overflows


def _normalize_axes(reduce_axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    if any(not -ndim <= a < ndim for a in reduce_axes):
        raise ValueError(f"reduce_axes {reduce_axes} are not axes of a {ndim}-d weight")
    axes = tuple(sorted(a % ndim for a in reduce_axes))
    if len(set(axes)) != len(axes):
        raise ValueError(f"reduce_axes {reduce_axes} repeat an axis")
    return axes


def quantize_int8(w: jax.Array | np.ndarray, reduce_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(q int8 of w's shape, scale f32 of w's shape without reduce_axes): symmetric per-channel quantisation.

    The scale is computed in f32 whatever w's dtype; an all-zero channel gets scale 1 (so that q = 0 and nothing
    divides by zero). Rounding is to nearest, ties to even, and |q| <= 127.
    """
    w = jnp.asarray(w)
    axes = _normalize_axes(tuple(reduce_axes), w.ndim)
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axes)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(jnp.float32)
    q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, axes)), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, reduce_axes: tuple[int, ...],
               dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """q.astype(f32) * scale broadcast over reduce_axes, cast to dtype: the weight quantize_int8 approximated."""
    axes = _normalize_axes(tuple(reduce_axes), q.ndim)
    expected = tuple(d for i, d in enumerate(q.shape) if i not in axes)
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale {tuple(scale.shape)} does not fit a {tuple(q.shape)} weight reduced over {axes} "
                         f"(expected {expected})")
    return (q.astype(jnp.float32) * jnp.expand_dims(scale.astype(jnp.float32), axes)).astype(dtype)


def scale_labels(equation: str) -> str:
    """The labels of the weight's output axes (the scale's axes, in the weight's order) in an "x,w->out"
    equation; they must be the output's trailing labels, in the same order, so that the scale broadcasts
    against the output."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    x_labels, _, w_labels = inputs.partition(",")
    if not out or not w_labels or "." in w_labels:
        raise ValueError(f"qeinsum needs an explicit 'x,w->out' equation with no ellipsis in w, got {equation!r}")
    free = "".join(c for c in w_labels if c not in x_labels)
    if not out.endswith(free):
        raise ValueError(f"in {equation!r} the weight's output axes {free!r} must be the output's trailing axes, "
                         "in the weight's order (the per-channel scale is applied to the output)")
    return free


def qeinsum(equation: str, x: jax.Array, w: jax.Array, scale: jax.Array | None) -> jax.Array:
    """einsum(equation, x, w) in x's dtype, for a float w (scale None) or an int8 w with its per-channel scale.

    scale None: exactly jnp.einsum(equation, x, w.astype(x.dtype)). int8 w: equal, to float rounding, to
    einsum(equation, x, dequantize(w, scale, ...)); the contraction reads w's int8 values, accumulates in f32, and
    the scale (shape: w's output axes, which must be the output's trailing axes) multiplies the f32 result, rounded
    once to x's dtype. Differentiable in x (and in scale); w, an integer array, has no gradient.
    """
    if scale is None:
        if jnp.issubdtype(w.dtype, jnp.integer):
            raise ValueError(f"qeinsum({equation!r}): an integer weight {w.dtype} needs its scale")
        return jnp.einsum(equation, x, w.astype(x.dtype))
    if w.dtype != jnp.int8:
        raise ValueError(f"qeinsum({equation!r}): a scale goes with an int8 weight, got {w.dtype}")
    free = scale_labels(equation)
    w_labels = equation.replace(" ", "").partition("->")[0].partition(",")[2]
    expected = tuple(w.shape[w_labels.index(c)] for c in free)
    if tuple(scale.shape) != expected:
        raise ValueError(f"qeinsum({equation!r}): scale {tuple(scale.shape)} does not match the weight's output "
                         f"axes {expected} (w {tuple(w.shape)})")
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum(equation, x.astype(compute), w.astype(compute), preferred_element_type=jnp.float32)
    return round_to(y * scale.astype(jnp.float32), x.dtype)
