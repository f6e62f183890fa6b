"""Sharding: adapter and optimizer shardings derived from the base. Private; see :mod:`lora_jax`."""
