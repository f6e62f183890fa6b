"""Shared test set-up.

Strict dtype promotion (``jax.numpy_dtype_promotion("strict")``) is turned on by
the ``strict_promotion`` fixture for tests that exercise lora_jax alone: an
implicit float32/bfloat16 mix in the core is then an error. It is not global
because flax's normalization layers (bfloat16) and optax's Adam bias correction
promote implicitly and fail under it.
"""

from __future__ import annotations

import jax
import pytest


@pytest.fixture
def strict_promotion():
    """Run the test with ``jax_numpy_dtype_promotion="strict"``."""
    with jax.numpy_dtype_promotion("strict"):
        yield


collect_ignore = ["fixtures"]  # data and the script that wrote it (tests/fixtures/make_checkpoint_v1.py), not tests
