"""``LoraSpec`` and its JSON form. Private; see :mod:`lora_jax`."""
