"""Choosing targets: parameter paths, kernel layouts and target selection. Private; see :mod:`lora_jax`."""
