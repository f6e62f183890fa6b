"""``python -m lora_jax``: see :mod:`lora_jax._cli`."""

import sys

from lora_jax._cli import main

if __name__ == "__main__":
    sys.exit(main())
