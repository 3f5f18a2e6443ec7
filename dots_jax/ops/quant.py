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

import functools

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


# XLA:CPU does not fuse a convert into a dot: dot(x, q.astype(f32)) first writes an f32 copy of the whole weight
# (4 bytes per weight, plus page faults on the fresh buffer), then reads it, and at decode sizes runs 10x slower than
# the f32 product it replaces; a multiply-reduce that reads int8 in one loop is slower still (a strided column
# reduction). At decode sizes the product therefore runs over chunks of the weight's rows: each chunk is converted
# into a small buffer that stays in cache and multiplied at once (benchmarks/quant_cpu.py). At prefill sizes the
# matmul is compute-bound and one conversion of the whole weight is the cheaper form.
CHUNKED_MAX_ROWS = 64  # x rows up to which the chunked form runs
CHUNK_ELEMENTS = 1 << 16  # a chunk's f32 buffer: 256 KiB, a quarter of this machine's L2 per core


def chunk_rows(m: int, k: int, n: int) -> int:
    """Weight rows per chunk for an [m, k] @ [k, n] int8 product: k (one conversion) past CHUNKED_MAX_ROWS rows of
    x; else a power of two in [16, 128], at least CHUNK_ELEMENTS / n and at least 2m (so that the [m, n]
    accumulator's traffic stays below the chunk's)."""
    if m > CHUNKED_MAX_ROWS:
        return k
    by_size = 1 << max(0, (CHUNK_ELEMENTS // n).bit_length() - 1)  # the largest power of two <= CHUNK_ELEMENTS / n
    by_rows = 1 << (2 * m - 1).bit_length()  # the smallest power of two >= 2m
    return min(k, 128, max(16, by_size, by_rows))


def _chunks(k: int, chunk: int) -> tuple[int, int]:
    """(number of whole chunks, rows left over for one last, shorter product)."""
    return k // chunk, k % chunk


def _product(x: jax.Array, q: jax.Array, chunk: int) -> jax.Array:
    """f32 x [m, k] @ q [k, n] (int8), converting chunk rows of q at a time."""
    count, tail = _chunks(q.shape[0], chunk)
    if count <= 1 and not tail or chunk >= q.shape[0]:
        return jnp.dot(x, q.astype(jnp.float32), preferred_element_type=jnp.float32)

    def step(i: jax.Array, acc: jax.Array) -> jax.Array:
        xs = jax.lax.dynamic_slice_in_dim(x, i * chunk, chunk, axis=1)
        qs = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=0)
        return acc + jnp.dot(xs, qs.astype(jnp.float32), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, count, step, jnp.zeros((x.shape[0], q.shape[1]), jnp.float32))
    if tail:
        acc += jnp.dot(x[:, count * chunk:], q[count * chunk:].astype(jnp.float32), preferred_element_type=jnp.float32)
    return acc


def _product_transposed(dy: jax.Array, q: jax.Array, chunk: int) -> jax.Array:
    """f32 dy [m, n] @ q^T [n, k] (int8 q [k, n]), converting chunk rows of q at a time: the gradient of _product."""
    count, tail = _chunks(q.shape[0], chunk)
    if count <= 1 and not tail or chunk >= q.shape[0]:
        return jnp.einsum("mn,kn->mk", dy, q.astype(jnp.float32), preferred_element_type=jnp.float32)

    def step(i: jax.Array, dx: jax.Array) -> jax.Array:
        qs = jax.lax.dynamic_slice_in_dim(q, i * chunk, chunk, axis=0)
        part = jnp.einsum("mn,kn->mk", dy, qs.astype(jnp.float32), preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(dx, part, i * chunk, axis=1)

    dx = jax.lax.fori_loop(0, count, step, jnp.zeros((dy.shape[0], q.shape[0]), jnp.float32))
    if tail:
        part = jnp.einsum("mn,kn->mk", dy, q[count * chunk:].astype(jnp.float32), preferred_element_type=jnp.float32)
        dx = dx.at[:, count * chunk:].set(part)
    return dx


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array, chunk: int) -> jax.Array:
    return _product(x, q, chunk) * scale


def _int8_matmul_fwd(x: jax.Array, q: jax.Array, scale: jax.Array, chunk: int
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    # The residuals are the int8 weight and the unscaled output, never an f32 copy of the weight (which autodiff of
    # dot(x, q.astype(f32)) would keep: LoRA on an int8 base would hold the f32 model for its backward pass).
    y = _product(x, q, chunk)
    return y * scale, (q, scale, y)


def _int8_matmul_bwd(chunk: int, residuals: tuple[jax.Array, jax.Array, jax.Array], d_out: jax.Array
                     ) -> tuple[jax.Array, None, jax.Array]:
    q, scale, y = residuals
    d_out = d_out.astype(jnp.float32)
    d_x = _product_transposed(d_out * scale, q, chunk)
    return d_x, None, jnp.sum(y * d_out, axis=0)  # the int8 weight: no cotangent


_int8_matmul.defvjp(_int8_matmul_fwd, _int8_matmul_bwd)


def int8_matmul(x: jax.Array, q: jax.Array, scale: jax.Array) -> jax.Array:
    """f32 [m, n] = (x [m, k] @ q [k, n] int8) * scale [n], in the form XLA:CPU runs fastest at this shape (see
    chunk_rows). Differentiable in x and scale; the products are f32 (exact for int8 times bf16 or f32 values)."""
    m, k = x.shape
    return _int8_matmul(x.astype(jnp.float32), q, scale.astype(jnp.float32), chunk_rows(m, k, q.shape[1]))


def scale_rows(out: jax.Array, rhs_scale: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """f32 [m, n]: a grouped matmul's unscaled f32 output (lhs @ q per group) times each row's group's scale
    rhs_scale [g, n]; rows past sum(group_sizes) give zeros whatever out holds there."""
    group, valid = row_groups(group_sizes, out.shape[0])
    scaled = out.astype(jnp.float32) * rhs_scale.astype(jnp.float32)[group]
    return jnp.where(valid[:, None], scaled, 0.0)
