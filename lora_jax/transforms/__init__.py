"""Transforms over params and adapter trees: apply, merge, optax masking, summary. Private; see :mod:`lora_jax`."""
