"""How :func:`lora_jax.factored` computes each use of an adapted kernel: the strategies and the default's choice.

* ``"factored"``: ``x·W + s·(x·A)·B``; ``W + s·A·B`` is never formed, not even
  transiently. Needed for LoRA dropout (the adapter branch sees the dropped
  input) and for per-example adapters.
* ``"dense"``: ``x·(W + s·A·B)`` with the kernel formed per use and dropped, and
  a custom backward that computes ``dA``, ``dB`` from the factors
  (:mod:`lora_jax.factored._dense`). One dense product instead of the base
  product plus two activation-sized thin ones; no weight gradient.
* ``"auto"`` (the default): per use, ``"dense"`` when the use has enough rows
  for forming the kernel to pay, else ``"factored"``; always ``"factored"``
  where LoRA dropout is applied. See :func:`auto_is_dense` for the rule and
  its measured threshold.

Every strategy never computes a weight gradient and gives the values and
gradients of ``fn(apply_lora(params, lora))``.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from lora_jax.errors._messages import expected
from lora_jax.factored._lazy import FactoredError, LazyKernel

STRATEGIES = ("auto", "factored", "dense")

# "auto" runs a use dense when rows >= THRESHOLD * 2·in·out / (in + out). At 1.0 that is where the two
# strategies' FLOPs are equal: dense adds two kernel formings (r·in·out each, forward and backward) and
# saves one activation-sized thin product pair (rows·r·(in + out)). Per backend, measured with
# benchmarks/bench_models.py --strategies auto:0,auto:0.25,auto:0.5,auto:1,factored (benchmarks/README.md);
# a backend not listed uses the FLOP rule. CPU: dense wins time and memory well below the FLOP break-even
# (at 128 tokens on d=256 kernels) but loses at 16 tokens; 0.25 runs both of those the faster way.
AUTO_THRESHOLD = {"cpu": 0.25}
FLOP_THRESHOLD = 1.0


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


def use_size(name: str, invals: list[Any], params: dict[str, Any]) -> tuple[int, int, int]:
    """``(rows, in, out)`` of a ``dot_general``/``conv_general_dilated`` use of one lazy kernel.

    ``rows`` counts the input's positions each kernel column meets (tokens for a
    dense layer; batch x output pixels for a conv); ``in`` and ``out`` are the
    kernel's contracted and produced sizes (batch axes shared by input and
    kernel cancel out of the rule and are left out).
    """
    if name == "dot_general":
        lhs, rhs = invals
        kernel_rhs = isinstance(rhs, LazyKernel)
        lk, x = (rhs, lhs) if kernel_rhs else (lhs, rhs)
        (lc, rc), (lb, rb) = params["dimension_numbers"]
        (kc, xc), (kb, xb) = ((rc, lc), (rb, lb)) if kernel_rhs else ((lc, rc), (lb, rb))
        rows = math.prod(d for i, d in enumerate(x.shape) if i not in xc and i not in xb)
        k_in = math.prod(lk.shape[k] for k in kc)
        k_out = math.prod(d for k, d in enumerate(lk.shape) if k not in kc and k not in kb)
        return rows, k_in, k_out
    x, lk = invals
    if not isinstance(lk, LazyKernel) or isinstance(x, LazyKernel):
        return 0, 1, 1  # no conv rule for a kernel as the input: it is refused or materialized anyway
    dn = params["dimension_numbers"]
    strides = math.prod(params["window_strides"])
    rows = x.shape[dn.lhs_spec[0]] * max(1, math.prod(x.shape[i] for i in dn.lhs_spec[2:]) // strides)
    k_out = lk.shape[dn.rhs_spec[0]]
    return rows, math.prod(lk.shape) // k_out, k_out


def auto_is_dense(rows: int, k_in: int, k_out: int, backend: str | None = None) -> bool:
    """The ``"auto"`` rule: dense when ``rows >= threshold · 2·in·out / (in + out)``.

    ``threshold`` is ``AUTO_THRESHOLD[backend]`` (measured), else 1.0, the point
    where both strategies do the same FLOPs. ``backend`` defaults to
    ``jax.default_backend()`` at trace time.

    Example:
      >>> auto_is_dense(4096, 256, 1024, backend="gpu"), auto_is_dense(16, 1024, 1024, backend="gpu")
      (True, False)
    """
    threshold = AUTO_THRESHOLD.get(backend or jax.default_backend(), FLOP_THRESHOLD)
    return rows * (k_in + k_out) >= threshold * 2 * k_in * k_out


def use_dense(strategy: str, lk: LazyKernel, dropping: bool, size: tuple[int, int, int]) -> bool:
    """Whether this use of ``lk`` runs dense; raises where ``"dense"`` cannot be honoured (LoRA dropout, DoRA)."""
    if strategy == "factored" or lk.quantized:  # a quantized base: dequantized inside the base product only
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
    return strategy == "dense" or auto_is_dense(*size)
