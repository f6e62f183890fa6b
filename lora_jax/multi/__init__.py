"""Many adapters over one base: the adapter bank, mixed batches, hot swapping, weighted combination. Private; see
:mod:`lora_jax`."""
