"""Compute backends behind one signature each: the grouped matmul registry and CPU loop kernels, fused losses."""
