"""How :func:`lora_jax.factored` computes each use of an adapted kernel: the strategies and the default's choice.

* ``"factored"``: ``x·W + s·(x·A)·B``; ``W + s·A·B`` is never formed, not even
  transiently. Needed for LoRA dropout (the adapter branch sees the dropped
  input) and for per-example adapters.
* ``"dense"``: ``x·(W + s·A·B)`` with the kernel formed per use and dropped, and
  a custom backward that computes ``dA``, ``dB`` from the factors
  (:mod:`lora_jax.factored._dense`). One dense product instead of the base
  product plus two activation-sized thin ones; no weight gradient.
* ``"auto"`` (the default): per use, the strategy measured faster for it on the
  backend that runs it (:func:`use_dense`).

Every strategy never computes a weight gradient and gives the values and
gradients of ``fn(apply_lora(params, lora))``.
"""

from __future__ import annotations

from typing import Any

import jax

from lora_jax.errors._messages import expected
from lora_jax.factored._lazy import FactoredError, LazyKernel

STRATEGIES = ("auto", "factored", "dense")


def check_strategy(strategy: Any) -> None:
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(
            expected(
                "factored(strategy=...)",
                f"one of {', '.join(map(repr, STRATEGIES))}",
                strategy,
                'use strategy="auto" (the default) unless you measured otherwise',
            )
        )


def use_dense(strategy: str, lk: LazyKernel, x: jax.Array, dropping: bool) -> bool:
    """Whether this use of ``lk`` (with input ``x``) runs dense; raises where ``"dense"`` cannot be honoured."""
    if strategy == "factored":
        return False
    if dropping:
        if strategy == "dense":
            raise FactoredError(
                f"{lk.path}: factored(fn, strategy='dense') cannot apply LoRA dropout ({lk.dropout:g}): the "
                f"adapter branch must see the dropped input, so W + s·A·B cannot be used as one kernel. Use "
                f"strategy='auto' or 'factored' to train with dropout, or deterministic=True to evaluate."
            )
        return False
    if strategy == "dense":
        return True
    return _auto_dense(lk, x)


def _auto_dense(lk: LazyKernel, x: jax.Array) -> bool:
    del lk, x
    return True
