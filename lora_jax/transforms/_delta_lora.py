"""Delta-LoRA: the base kernels follow the adapters' change, ``W += rate·(Δ_after - Δ_before)``."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.adapters import _lowered
from lora_jax.adapters._lowered import LowRank
from lora_jax.adapters._tree import lowered_items
from lora_jax.errors._checks import check_params
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf, map_with_paths


def delta_lora_update(params: Any, lora_before: Any, lora_after: Any, *, rate: float) -> Any:
    """Delta-LoRA's update of the base: each adapted kernel gets ``rate·(Δ_after - Δ_before)``.

    ``Δ = s·A·B`` is the adapter's delta (:func:`lora_jax.apply_lora`'s), so
    after an optimizer step from ``lora_before`` to ``lora_after`` the frozen
    ``W`` also moves by ``rate`` times the change of the low-rank update
    (Zi et al., 2023, "Delta-LoRA", their ``λ``). The sum is formed in float32
    (float64 for a float64 kernel) and cast to the kernel's dtype once. The
    update runs under ``jit`` with ``params`` donated: its buffers are reused
    for the result, so do not use ``params`` after the call. Other leaves are
    returned as they are.

    The base then changes during training: save it with the adapters (an orbax
    checkpoint of the params), since the adapter alone no longer reproduces the
    model. Call it outside your jitted step (or inside, where the donation is
    your step's): ``params = delta_lora_update(params, lora, new_lora, rate=0.5)``.

    Args:
      params: the base parameters the adapters were made for.
      lora_before: the adapter tree before the optimizer step.
      lora_after: the adapter tree after it (same paths, ranks, scales and layouts).
      rate: ``λ``, a float (0 leaves ``params`` unchanged).

    Raises:
      TypeError: ``rate`` is not a real number.
      ValueError: the two adapters differ in paths, ranks, scales or layouts; an
        adapted kernel is a quantized base leaf (its codes cannot take a float
        update: dequantize it, or do not use Delta-LoRA on it); a DoRA adapter
        (its effective weight is not ``W + Δ``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora
      >>> params = {"dense": {"kernel": jnp.zeros((3, 2))}}
      >>> before = init_lora(jax.random.key(0), params, LoraSpec(rank=1, targets=["dense"], init="random"))
      >>> after = jax.tree.map(lambda v: 2 * v, before)
      >>> new = delta_lora_update(params, before, after, rate=0.5)
      >>> d = lambda lo: lo["dense"]["kernel"].delta()
      >>> bool(jnp.allclose(new["dense"]["kernel"], 0.5 * (d(after) - d(before))))
      True
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)):
        raise TypeError(expected("delta_lora_update(rate=...)", "a real number (Delta-LoRA's lambda)", rate))
    check_params("delta_lora_update", params, order="delta_lora_update(params, lora_before, lora_after, rate=...)")
    before, after = _pairs(lora_before, lora_after)
    flat = flatten_with_paths(params, is_leaf=is_base_leaf)
    for path in before:
        if path not in flat:
            raise ValueError(
                expected(f"delta_lora_update(params=...) at {path}", "the kernel the adapters were made for",
                         "no such path", "pass the params the adapters were initialised on", found_is_text=True)
            )  # fmt: skip
        if is_base_leaf(flat[path]):
            raise ValueError(
                expected(
                    f"delta_lora_update(params=...) at {path}",
                    "a float kernel",
                    f"a quantized base leaf ({type(flat[path]).__name__})",
                    "its codes cannot take a float update: lora_jax.dequantize the base first, or leave Delta-LoRA "
                    "out for quantized bases",
                    found_is_text=True,
                )
            )
    return _update(params, before, after, float(rate))


def _pairs(lora_before: Any, lora_after: Any) -> tuple[dict[str, LowRank], dict[str, LowRank]]:
    before = {p: x for p, x in lowered_items(lora_before).items() if isinstance(x, LowRank)}
    after = {p: x for p, x in lowered_items(lora_after).items() if isinstance(x, LowRank)}
    if set(before) != set(after):
        diff = sorted(set(before) ^ set(after))
        raise ValueError(
            expected("delta_lora_update(lora_before, lora_after)", "two states of one adapter (the same paths)",
                     f"paths in only one of them: {', '.join(diff[:3])}",
                     "pass the adapter tree before and after one optimizer step", found_is_text=True)
        )  # fmt: skip
    for path, b in before.items():
        a = after[path]
        same = (b.scale, b.layout, b.a.shape, b.b.shape) == (a.scale, a.layout, a.a.shape, a.b.shape)
        if not same:
            raise ValueError(
                expected(f"delta_lora_update at {path}", "the same scale, layout and factor shapes before and after",
                         f"{(b.scale, b.layout, b.a.shape)} before, {(a.scale, a.layout, a.a.shape)} after",
                         "pass two states of one adapter", found_is_text=True)
            )  # fmt: skip
        if b.magnitude is not None:
            raise ValueError(
                f"delta_lora_update at {path}: a DoRA adapter's effective weight is (m / n)·(W + Δ), not W + Δ, "
                "so Delta-LoRA's update of W is not defined for it. Use it with plain LoRA adapters."
            )
    return before, after


@functools.partial(jax.jit, donate_argnums=0)
def _update(params: Any, before: dict[str, LowRank], after: dict[str, LowRank], rate: float) -> Any:
    def one(path: str, w: Any) -> Any:
        if path not in before:
            return w
        dtype = _lowered.compute_dtype(w.dtype)
        change = _lowered.delta(after[path], dtype) - _lowered.delta(before[path], dtype)
        return (w.astype(dtype) + jnp.asarray(rate, dtype) * change).astype(w.dtype)

    return map_with_paths(one, params)


__all__ = ["delta_lora_update"]
