"""Bad-input errors: one shape for every message. Private; see :mod:`lora_jax`."""
