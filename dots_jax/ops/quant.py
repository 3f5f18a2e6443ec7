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

from dots_jax.ops.common import round_to, row_groups

__all__ = ["dequantize", "qeinsum", "quantize_int8", "scale_labels", "scale_rows"]

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
    inputs, out_labels = equation.replace(" ", "").split("->")
    x_labels, w_labels = inputs.split(",")
    expected = tuple(w.shape[w_labels.index(c)] for c in free)
    if tuple(scale.shape) != expected:
        raise ValueError(f"qeinsum({equation!r}): scale {tuple(scale.shape)} does not match the weight's output "
                         f"axes {expected} (w {tuple(w.shape)})")
    contracted = w_labels[:len(w_labels) - len(free)]
    scale = scale.astype(jnp.float32)
    if w_labels == contracted + free and x_labels.endswith(contracted) \
            and out_labels == x_labels[:len(x_labels) - len(contracted)] + free:
        # x [..., K] @ w [K, N]: every projection of the model has its contracted axes first in the weight and last
        # in x, so the product is one 2-d matmul, whose form is chosen by its shape.
        k = int(np.prod(w.shape[:len(contracted)]))
        n = int(np.prod(w.shape[len(contracted):]))
        batch = x.shape[:x.ndim - len(contracted)]
        y = int8_matmul(x.reshape(-1, k), w.reshape(k, n), scale.reshape(n))
        return round_to(y.reshape(*batch, *w.shape[len(contracted):]), x.dtype)
    compute = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.einsum(equation, x.astype(compute), w.astype(compute), preferred_element_type=jnp.float32)
    return round_to(y * scale, x.dtype)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """f32 [m, n] = (x [m, k] @ q [k, n] int8) * scale [n], in the form XLA:CPU runs fastest at this shape
    (benchmarks/quant_cpu.py)."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return jnp.dot(x, q.astype(x.dtype), preferred_element_type=jnp.float32) * scale


def scale_rows(out: jax.Array, rhs_scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """f32 [m, n]: a grouped matmul's unscaled f32 output (lhs @ q per group) times each row's group's scale
    rhs_scale [g, n]; rows past sum(group_sizes) give zeros whatever out holds there."""
    group, valid = row_groups(group_sizes, out.shape[0])
    scaled = out.astype(jnp.float32) * rhs_scale.astype(jnp.float32)[group]
    return jnp.where(valid[:, None], scaled, 0.0)
