"""How :func:`lora_jax.factored` computes each use of an adapted kernel: the strategies and the default's choice.

* ``"factored"``: ``x·W + s·(x·A)·B``; ``W + s·A·B`` is never formed, not even
  transiently. Needed for LoRA dropout (the adapter branch sees the dropped
  input) and for per-example adapters.
* ``"dense"``: ``x·(W + s·A·B)`` with the kernel formed per use and dropped, and
  a custom backward that computes ``dA``, ``dB`` from the factors
  (:mod:`lora_jax.factored._dense`). One dense product instead of the base
  product plus two activation-sized thin ones; no weight gradient.
* ``"auto"``: for now, ``"dense"`` wherever it is allowed and ``"factored"``
  where LoRA dropout is applied. A per-use rule chosen by measurement (rows
  against kernel size, per backend) is still to come; ``"factored"`` stays the
  default of :func:`lora_jax.factored` until it is measured on the grid of
  ``benchmarks/bench_models.py``.

Every strategy never computes a weight gradient and gives the values and
gradients of ``fn(apply_lora(params, lora))``.
"""

from __future__ import annotations

from typing import Any

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


def use_dense(strategy: str, lk: LazyKernel, dropping: bool) -> bool:
    """Whether this use of ``lk`` runs dense; raises where ``"dense"`` cannot be honoured (LoRA dropout)."""
    if strategy == "factored":
        return False
    if lk.g is not None:  # DoRA: the dense rule has no gradient for m yet
        if strategy == "dense":
            raise FactoredError(
                f"{lk.path}: factored(fn, strategy='dense') does not support DoRA adapters yet (its custom "
                f"backward has no gradient for the magnitude m). Use strategy='factored' (or 'auto', which "
                f"runs DoRA kernels factored)."
            )
        return False
    if dropping:
        if strategy == "dense":
            raise FactoredError(
                f"{lk.path}: factored(fn, strategy='dense') cannot apply LoRA dropout ({lk.dropout:g}): the "
                f"adapter branch must see the dropped input, so W + s·A·B cannot be used as one kernel. Use "
                f"strategy='auto' or 'factored' to train with dropout, or deterministic=True to evaluate."
            )
        return False
    return True  # "dense", and "auto" until its per-use rule is measured
