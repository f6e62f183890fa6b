"""Factored execution: the jaxpr interpreter, the lazy kernel and its per-primitive rules. Private; see :mod:`lora_jax`."""
