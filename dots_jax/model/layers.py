"""Building blocks every layer uses: the parameter constructor with logical axes, and RMSNorm."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

DType = jnp.dtype | type


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: tuple[str | None, ...], dtype: DType,
           init: Callable | None = None, std: float = 0.02) -> nnx.Param:
    init = init or jax.nn.initializers.normal(std)
    # eager_sharding=False: the axes are names for the sharding table, applied later under a mesh.
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype: DType, axis_name: str, rngs: nnx.Rngs):
        self.eps = eps
        self.weight = param(rngs, (dim,), (axis_name,), param_dtype, init=jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        # f32 statistics, cast back to the activation dtype BEFORE the weight multiply (as the reference).
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)
