"""Pallas grouped-matmul kernels for the MoE experts, each with a pure-jnp reference."""
