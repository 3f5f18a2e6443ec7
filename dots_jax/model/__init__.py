"""The dots1 model: layers, attention, MoE routing and dispatch, the KV cache."""
