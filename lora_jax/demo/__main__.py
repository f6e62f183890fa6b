"""``python -m lora_jax.demo`` runs the demo (same as ``python -m lora_jax demo``)."""

import sys

from lora_jax.demo import main

if __name__ == "__main__":
    sys.exit(main())
