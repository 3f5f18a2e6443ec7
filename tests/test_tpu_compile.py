"""Ahead-of-time TPU compilation on a CPU machine: the Pallas gmm kernels and a whole MoE layer using them,
at dots1 shapes, compiled by the real TPU compiler (libtpu, from the [test] extra) for a v5p:2x2x2 slice.

Nothing runs on a TPU: jax.experimental.topologies describes the devices, jit(...).lower(...) with sharded
ShapeDtypeStructs traces for them, and .compile() runs XLA:TPU and Mosaic. The compiled module must hold our
Mosaic kernels (custom calls "tpu_custom_call" named after the kernels).

Mosaic kernels cannot be partitioned by XLA's SPMD partitioner, so on more than one chip they run inside
shard_map: here the experts are split over the 8 chips (each runs only its own experts, via group_offset)
and the MoE layer splits the tokens over them.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import NO_TPU_COMPILE_ENV, require_libtpu
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-16")  # quiets libtpu's start-up probing

from jax.experimental import topologies  # noqa: E402

from dots_jax.model.moe import moe_experts, route  # noqa: E402
from dots_jax.ops.common import silu  # noqa: E402
from pallas_kernels import gmm as pallas_gmm  # noqa: E402

HIDDEN, EXPERT_WIDTH, EXPERTS, TOP_K, SHARED_WIDTH = 4096, 1408, 128, 6, 2816  # dots.llm1


@pytest.fixture(scope="module", autouse=True)
def _libtpu() -> None:
    require_libtpu()


def test_missing_libtpu_fails_loudly_unless_opted_out(monkeypatch) -> None:
    """CI must not go green with the TPU compile tests skipped: without libtpu they fail, naming the [test] extra,
    unless DOTS_JAX_NO_TPU_COMPILE=1 asks for the skip."""
    monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` now raises ImportError
    monkeypatch.delenv(NO_TPU_COMPILE_ENV, raising=False)
    with pytest.raises(pytest.fail.Exception, match=r"\[test\] extra"):
        require_libtpu()
    monkeypatch.setenv(NO_TPU_COMPILE_ENV, "1")
    with pytest.raises(pytest.skip.Exception, match=NO_TPU_COMPILE_ENV):
        require_libtpu()


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x2")
    assert len(topology.devices) == 8 and topology.devices[0].platform == "tpu"
    return jax.sharding.Mesh(np.asarray(topology.devices), ("x",))


def abstract(shape: tuple[int, ...], dtype, mesh: jax.sharding.Mesh, spec: P) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def mosaic_kernels(compiled) -> set[str]:
    """Names of our Pallas kernels among the compiled module's Mosaic custom calls."""
    text = compiled.as_text()
    assert "tpu_custom_call" in text, "no Mosaic kernel in the compiled module"
    return {name for name in ("dots_gmm_t", "dots_gmm", "dots_tgmm") if name in text}


@pytest.mark.parametrize("rows_per_expert", [8, 512])  # decode-sized and prefill-sized
def test_gmm_and_gradient_compile_for_tpu_expert_sharded(mesh, rows_per_expert: int) -> None:
    """The kernel's forward and both gradients (gate/up shape: k = 4096, n = 1408), experts split over the
    8 chips: each shard owns 16 experts and passes its first one as group_offset."""
    m = rows_per_expert * EXPERTS
    local = EXPERTS // mesh.size

    def shard(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, d_out: jax.Array):
        offset = jax.lax.axis_index("x") * local

        def loss(a: jax.Array, b: jax.Array) -> jax.Array:
            out = pallas_gmm.gmm(a, b, group_sizes, group_offset=offset, platform="tpu")
            return jnp.vdot(out.astype(jnp.float32), d_out.astype(jnp.float32))

        d_lhs, d_rhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs)
        return jax.lax.psum(d_lhs, "x"), d_rhs  # rows of other shards' experts get 0 here: sum the shards

    fn = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("x"), P(), P()), out_specs=(P(), P("x")),
                       check_vma=False)
    args = (abstract((m, HIDDEN), jnp.bfloat16, mesh, P()),
            abstract((EXPERTS, HIDDEN, EXPERT_WIDTH), jnp.bfloat16, mesh, P("x")),
            abstract((EXPERTS,), jnp.int32, mesh, P()),
            abstract((m, EXPERT_WIDTH), jnp.bfloat16, mesh, P()))
    compiled = jax.jit(fn).lower(*args).compile()
    assert mosaic_kernels(compiled) == {"dots_gmm", "dots_gmm_t", "dots_tgmm"}


def test_gmm_with_int8_rhs_compiles_for_tpu(mesh) -> None:
    """int8 expert weights (rhs_scale), decode-sized, experts split over the 8 chips: the forward and d_lhs kernels
    (which convert the int8 blocks in VMEM) pass Mosaic; no tgmm, since an int8 rhs has no gradient."""
    m, local = 8 * EXPERTS, EXPERTS // mesh.size

    def shard(lhs: jax.Array, rhs: jax.Array, scale: jax.Array, group_sizes: jax.Array, d_out: jax.Array):
        offset = jax.lax.axis_index("x") * local

        def loss(a: jax.Array) -> jax.Array:
            out = pallas_gmm.gmm(a, rhs, group_sizes, group_offset=offset, rhs_scale=scale, platform="tpu")
            return jnp.vdot(out.astype(jnp.float32), d_out.astype(jnp.float32))

        return jax.lax.psum(jax.grad(loss)(lhs), "x")

    fn = jax.shard_map(shard, mesh=mesh, in_specs=(P(), P("x"), P("x"), P(), P()), out_specs=P(), check_vma=False)
    args = (abstract((m, HIDDEN), jnp.bfloat16, mesh, P()),
            abstract((EXPERTS, HIDDEN, EXPERT_WIDTH), jnp.int8, mesh, P("x")),
            abstract((EXPERTS, EXPERT_WIDTH), jnp.float32, mesh, P("x")),
            abstract((EXPERTS,), jnp.int32, mesh, P()),
            abstract((m, EXPERT_WIDTH), jnp.bfloat16, mesh, P()))
    compiled = jax.jit(fn).lower(*args).compile()
    assert mosaic_kernels(compiled) == {"dots_gmm", "dots_gmm_t"}


def moe_layer(x: jax.Array, router: jax.Array, bias: jax.Array, gate: jax.Array, up: jax.Array,
              down: jax.Array, shared_gate: jax.Array, shared_up: jax.Array, shared_down: jax.Array) -> jax.Array:
    """dots1's MoE block on this chip's tokens: routing, the routed experts (backend "pallas"), the shared
    experts."""
    weights, experts, _ = route(x, router, bias, top_k=TOP_K, n_group=1, topk_group=1, norm_topk_prob=True,
                                routed_scaling_factor=2.5)
    routed = moe_experts(x, weights, experts, gate, up, down, backend="pallas")
    shared = (silu(x @ shared_gate) * (x @ shared_up)) @ shared_down
    return routed + shared


@pytest.mark.parametrize("mode", ["forward", "train"])
def test_moe_layer_compiles_for_tpu(mesh, mode: str) -> None:
    """A whole MoE layer with the "pallas" backend (picked at lowering: Mosaic for TPU), tokens split over the
    chips, 64 tokens each (384 expert rows per chip); "train" adds the gradient of every weight."""
    tokens = 64 * mesh.size
    shapes = [((tokens, HIDDEN), P("x")), ((HIDDEN, EXPERTS), P()), ((EXPERTS,), P()),
              ((EXPERTS, HIDDEN, EXPERT_WIDTH), P()), ((EXPERTS, HIDDEN, EXPERT_WIDTH), P()),
              ((EXPERTS, EXPERT_WIDTH, HIDDEN), P()), ((HIDDEN, SHARED_WIDTH), P()),
              ((HIDDEN, SHARED_WIDTH), P()), ((SHARED_WIDTH, HIDDEN), P())]
    dtypes = [jnp.bfloat16, jnp.float32, jnp.float32] + [jnp.bfloat16] * 6
    args = [abstract(shape, dtype, mesh, spec) for (shape, spec), dtype in zip(shapes, dtypes, strict=True)]
    layer = jax.shard_map(moe_layer, mesh=mesh, in_specs=tuple(spec for _, spec in shapes), out_specs=P("x"),
                          check_vma=False)
    if mode == "train":
        def loss(*params: jax.Array) -> jax.Array:
            return jnp.sum(layer(*params).astype(jnp.float32) ** 2)

        fn = jax.grad(loss, argnums=tuple(range(3, 9)))
    else:
        fn = layer
    compiled = jax.jit(fn).lower(*args).compile()
    expected = {"dots_gmm"} | ({"dots_gmm_t", "dots_tgmm"} if mode == "train" else set())
    assert mosaic_kernels(compiled) == expected
    memory = compiled.memory_analysis()
    assert memory is not None and memory.temp_size_in_bytes > 0


def test_tiling_table_compiles_for_every_dots1_shape(mesh) -> None:
    """Every table entry, forward and backward, passes Mosaic on one chip (down: k = 1408, n = 4096; the
    shared width 2816 both ways), prefill- and decode-sized."""
    one_chip = jax.sharding.Mesh(np.asarray(mesh.devices).reshape(-1)[:1], ("x",))
    for k, n in ((1408, HIDDEN), (HIDDEN, SHARED_WIDTH), (SHARED_WIDTH, HIDDEN)):
        for m in (6 * 64, 6 * 8192):
            groups = EXPERTS if n != HIDDEN or k == EXPERT_WIDTH else 1

            def loss(a: jax.Array, b: jax.Array, group_sizes: jax.Array) -> jax.Array:
                return jnp.sum(pallas_gmm.gmm(a, b, group_sizes, platform="tpu").astype(jnp.float32))

            fn = jax.grad(loss, argnums=(0, 1))
            args = (abstract((m, k), jnp.bfloat16, one_chip, P()),
                    abstract((groups, k, n), jnp.bfloat16, one_chip, P()),
                    abstract((groups,), jnp.int32, one_chip, P()))
            compiled = jax.jit(functools.partial(fn)).lower(*args).compile()
            assert mosaic_kernels(compiled) == {"dots_gmm", "dots_gmm_t", "dots_tgmm"}, (m, k, n)


def test_splash_attention_compiles_for_tpu(mesh) -> None:
    """The "splash" attention backend at dots1's attention shapes (32 heads of 128, a 2048-token causal prompt:
    512-slot blocks, as at long context; padding keys), forward and the q/k/v gradients, heads split over the 8
    chips in shard_map: the compiled module holds splash's Mosaic kernels (forward, dq, dkv), not the
    interpreter. (The 32768-token prompt of the full model is a planner row: benchmarks/plan_table.py.)"""
    from dots_jax.ops.attention import attention

    b, s, n, d = 1, 2048, 32, 128

    def loss(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array) -> jax.Array:
        pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        out = attention(q, k, v, pos, pos, key_valid, q_offset=0, backend="splash")
        return jnp.sum(out.astype(jnp.float32))

    qkv = abstract((b, s, n, d), jnp.bfloat16, mesh, P())
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            qkv, qkv, qkv, abstract((b, s), jnp.bool_, mesh, P())).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text
    for phase in ("fwd", "dq", "dkv"):  # the forward saves its logsumexp for the backward: "_residuals"
        assert f"splash_mqa_{phase}_segmented_" in text, phase


@pytest.mark.parametrize(("dtype", "window"), [(jnp.bfloat16, None), (jnp.float32, 64)], ids=["bf16", "f32-window64"])
def test_ragged_paged_attention_compiles_for_tpu(mesh, dtype, window: int | None) -> None:
    """The "ragged" paged attention backend at dots1's attention shapes (32 query and 32 key/value heads of 128): a
    mixed step of 8 rows of 16 query slots over a pool of 16-slot pages, full attention in bf16 and a sliding window
    in f32, heads split over the 8 chips in shard_map: the compiled module holds the Mosaic kernel, not the
    interpreter."""
    from dots_jax.ops.common import NO_WINDOW
    from dots_jax.ops.ragged_paged import ragged_paged_attention

    b, s, heads, d, page, pages_per_row, pool = 8, 16, 32, 128, 16, 8, 64

    def step(q, kv_pages, page_indices, kv_lens, q_lens):
        return ragged_paged_attention(q, kv_pages, page_indices, kv_lens, q_lens, window or NO_WINDOW)

    split = P(None, None, "x", None)
    args = (abstract((b, s, heads, d), dtype, mesh, split), abstract((pool, page, 2 * heads, d), dtype, mesh, split),
            abstract((b, pages_per_row), jnp.int32, mesh, P()), abstract((b,), jnp.int32, mesh, P()),
            abstract((b,), jnp.int32, mesh, P()))
    with jax.set_mesh(mesh):
        compiled = jax.jit(step).lower(*args).compile()
    text = compiled.as_text()
    assert "tpu_custom_call" in text and "ragged_paged_attention_kernel" in text
