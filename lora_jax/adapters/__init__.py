"""Adapter nodes: the node types, their registry and lowering, and ``init_lora``. Private; see :mod:`lora_jax`."""
