"""Files: orbax checkpoints and PEFT interchange. Private; see :mod:`lora_jax`."""
