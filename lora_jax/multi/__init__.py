"""Many adapters over one base: the adapter bank, mixed batches, hot swapping. Private; see :mod:`lora_jax`."""
