"""Meshes and the sharding rules table, tensor-parallel padding, multi-host start-up, host tuning."""
