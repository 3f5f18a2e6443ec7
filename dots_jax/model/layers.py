"""Building blocks every layer uses: the parameter constructor with logical axes, linear weights (float, or int8
with a per-output-channel scale), and RMSNorm.

int8 weights are plain parameters here rather than qwix's: qwix (0.1.8) swaps weights for its own QArray pytrees
(keepdims scales, no logical axes) while intercepting one traced method of a live module, which our layers, merged
from scanned state inside jax.lax.scan, the converter (no model at all) and the sharding table cannot see."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dots_jax.ops.quant import quantize_int8
from dots_jax.parallel.sharding import scale_axes

DType = jnp.dtype | type

QUANTIZE_MODES = ("int8",)  # weight-only quantisation modes (None: weights in param_dtype)
SCALE_SUFFIX = "_scale"  # an int8 weight `w` has its f32 per-output-channel scale beside it as `w_scale`
# The contracted (input) axes of every linear weight that may be quantised, by parameter name, counted from the end:
# the same numbers then hold for the stacked [layers, ...] parameter, for one layer's slice and for one expert's
# (the converter and the HF loader quantise slice by slice). The scale has the weight's other axes.
CONTRACTED: dict[str, tuple[int, ...]] = {
    "q_proj": (-3,), "k_proj": (-3,), "v_proj": (-3,),  # [H, n, d]
    "o_proj": (-3, -2),  # [n, d, H]
    "gate_proj": (-2,), "up_proj": (-2,), "down_proj": (-2,),  # [in, out], routed experts [E, in, out]
    "lm_head": (-2,),  # [H, V], only with quantize_head
}


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype: DType,
           init: Callable | None = None, std: float = 0.02) -> nnx.Param:
    init = init or jax.nn.initializers.normal(std)
    # eager_sharding=False: the axes are names for the sharding table, applied later under a mesh.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


def check_quantize(quantize: str | None) -> str | None:
    if quantize is not None and quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize={quantize!r}: one of {', '.join(map(repr, QUANTIZE_MODES))} or None")
    return quantize


def contracted_axes(name: str, ndim: int) -> tuple[int, ...]:
    """The contracted axes of linear weight `name` (CONTRACTED), as non-negative axes of an ndim-d array."""
    return tuple(a % ndim for a in CONTRACTED[name])


def linear(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype: DType, *, name: str,
           quantize: str | None, std: float) -> tuple[nnx.Param, nnx.Param | None]:
    """(weight, scale) of a linear layer. quantize None: the weight in `dtype` and no scale. "int8": the same
    random weight (drawn in f32) quantised per output channel: an int8 weight with the logical axes `axes`, and its
    f32 scale, whose logical axes are the weight's without the contracted ones (sharding.scale_axes)."""
    if quantize is None:
        return param(rngs, shape, axes, dtype, std=std), None
    contracted = contracted_axes(name, len(shape))
    q, scale = quantize_int8(jax.nn.initializers.normal(std)(rngs.params(), tuple(shape), jnp.float32), contracted)
    return (nnx.Param(q, out_sharding=axes, eager_sharding=False),
            nnx.Param(scale, out_sharding=scale_axes(axes, contracted), eager_sharding=False))


def read(w: nnx.Param | None) -> jax.Array | None:
    """A parameter's value, or None for an absent one (the scale of an unquantised weight)."""
    return None if w is None else w[...]


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: DType, axis_name: str, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), param_dtype, init=jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # f32 statistics, cast back to the activation dtype BEFORE the weight multiply (as the reference).
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
