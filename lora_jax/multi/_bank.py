"""A bank of adapters over one base: :func:`stack` them, :func:`select` one, replace one in place.

:func:`stack` writes every adapter into the bank's serving form
(:mod:`lora_jax.multi._slots`: scale folded into ``B``, ranks padded to the
largest, a missing target the identity) and stacks the arrays on a new leading
axis ``K``. :func:`select` reads one slot back as an adapter tree of
``LoraWeights`` (``DoraWeights`` on DoRA paths) with scale 1.0: the same tree
structure and static metadata for every slot, so one jitted function serves
them all with one trace, and a slot can be replaced
(:meth:`AdapterBank.replace`) by another adapter without retracing.
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters._dora import DoraWeights
from lora_jax.adapters._lowered import LowRank
from lora_jax.adapters._nodes import LoraWeights
from lora_jax.errors._messages import describe, expected
from lora_jax.multi import _forms
from lora_jax.multi._slots import Form, serving_dtypes, slot
from lora_jax.targets._paths import nest


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdapterBank:
    """``K`` adapters over one base, in serving form, stacked on a leading axis (a pytree).

    Attributes:
      a: ``{path: (K, *batch, *in, R)}``.
      b: ``{path: (K, *batch, R, *out)}``, each adapter's scale folded in.
      m: ``{path: (K, *batch, *out)}`` on DoRA paths only (the magnitudes).
      forms: the static form of every path (layout, kind, rank ``R``, kernel shape, DoRA or not).

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> loras = [lora_jax.init_lora(jax.random.key(k), params, lora_jax.LoraSpec(rank=r)) for k, r in [(0, 1), (1, 2)]]
      >>> bank = lora_jax.stack(loras)
      >>> len(bank), bank.a["dense/kernel"].shape, bank.b["dense/kernel"].shape
      (2, (2, 4, 2), (2, 2, 3))
    """

    a: dict[str, jax.Array]
    b: dict[str, jax.Array]
    m: dict[str, jax.Array]
    forms: tuple[Form, ...] = dataclasses.field(metadata={"static": True})

    def __len__(self) -> int:
        """The number of adapters ``K``."""
        first = self.forms[0].path
        return int(self.a[first].shape[0])

    def replace(self, i: int, adapter: Any, *, params: Any = None) -> AdapterBank:
        """A new bank with slot ``i`` holding ``adapter`` (same shapes and dtypes: a jitted server does not retrace).

        The adapter may target a subset of the bank's paths (the others become the identity) with ranks up to
        the bank's; a new path, a larger rank, or a DoRA adapter on a path the bank holds as plain LoRA does
        not fit the bank's arrays: stack the adapters again.

        Args:
          i: the slot, ``0 <= i < len(bank)`` (a Python int).
          adapter: an adapter tree (from ``init_lora``, ``load_adapter``, ``import_peft``, ...).
          params: the base params; needed when the bank has DoRA paths the adapter does not hold as DoRA.

        Returns:
          The new bank; this one is unchanged.

        Raises:
          IndexError: if ``i`` is out of range. TypeError: if ``i`` is not an int.
          ValueError: if the adapter does not fit the bank (the message names the path).

        Example:
          >>> import jax, jax.numpy as jnp, lora_jax
          >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
          >>> spec = lora_jax.LoraSpec(rank=2, init="random")
          >>> bank = lora_jax.stack([lora_jax.init_lora(jax.random.key(k), params, spec) for k in range(3)])
          >>> new = lora_jax.init_lora(jax.random.key(7), params, lora_jax.LoraSpec(rank=1, alpha=3.0, init="random"))
          >>> bank = bank.replace(1, new)
          >>> bool(jnp.allclose(lora_jax.apply_lora(params, lora_jax.select(bank, 1))["dense"]["kernel"],
          ...                   lora_jax.apply_lora(params, new)["dense"]["kernel"], atol=1e-6))
          True
        """
        where = "AdapterBank.replace"
        i = check_slot(i, len(self), where)
        lows = _forms.lowered_adapter(adapter, None, where)
        bases = _forms.base_leaves(params)
        forms = {f.path: f for f in self.forms}
        for path, low in lows.items():
            label = f"{where}: the adapter at {path}"
            _forms.check_fits_base(path, low, bases, f"{where}: the adapter")
            form = forms.get(path)
            if form is None:
                raise ValueError(
                    expected(
                        label,
                        f"one of the bank's paths ({', '.join(forms)})",
                        "a path the bank has no arrays for",
                        "stack the adapters again with lora_jax.stack([...]) to add a target",
                        found_is_text=True,
                    )
                )
            fits = (
                (tuple(low.kernel_shape), low.layout, low.kind) == (form.kernel_shape, form.layout, form.kind)
                and low.rank <= form.rank
                and (form.dora or low.magnitude is None)
            )
            if not fits:
                kind = "DoRA" if low.magnitude is not None else "LoRA"
                raise ValueError(
                    expected(
                        label,
                        f"rank <= {form.rank}, kernel shape {form.kernel_shape}, layout {form.layout!r}, kind "
                        f"{form.kind!r}{'' if form.dora else ', no DoRA magnitude'}",
                        f"a {kind} adapter of rank {low.rank}, kernel shape {tuple(low.kernel_shape)}, layout "
                        f"{low.layout!r}, kind {low.kind!r}",
                        "a slot keeps the bank's shapes; stack the adapters again with lora_jax.stack([...])",
                        found_is_text=True,
                    )
                )
        needed = {} if bases is None else {f.path: bases[f.path] for f in self.forms if f.dora and f.path in bases}
        return AdapterBank(*_replaced(self.forms, (self.a, self.b, self.m), lows, needed, i), self.forms)


@functools.partial(jax.jit, static_argnums=0)
def _replaced(
    forms: tuple[Form, ...], arrays: tuple[dict, ...], lows: dict[str, LowRank], bases: dict, i: Any
) -> tuple:
    """The bank's arrays with slot ``i`` rewritten (``i`` traced: one program for every slot)."""
    out = {"a": dict(arrays[0]), "b": dict(arrays[1]), "m": dict(arrays[2])}
    for form in forms:
        dtypes = (out["a"][form.path].dtype, out["b"][form.path].dtype)
        for name, x in slot(form, lows.get(form.path), bases.get(form.path), dtypes, "AdapterBank.replace").items():
            out[name][form.path] = out[name][form.path].at[i].set(x)
    return out["a"], out["b"], out["m"]


def check_slot(i: Any, size: int, where: str) -> int:
    """A concrete slot index in ``[0, size)``."""
    if not isinstance(i, (bool, int)) and hasattr(i, "__index__") and not np.ndim(i):
        i = operator.index(i)  # a NumPy or concrete JAX integer scalar
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(expected(f"{where}(i=...)", "a slot number (an int)", i))
    if not 0 <= i < size:
        raise IndexError(expected(f"{where}(i=...)", f"a slot in [0, {size})", i, f"the bank holds {size} adapters"))
    return i


def check_bank(bank: Any, where: str) -> AdapterBank:
    """``bank`` itself, or ``TypeError`` if it is not an :class:`AdapterBank`."""
    if not isinstance(bank, AdapterBank):
        raise TypeError(
            expected(
                f"{where}(bank=...)",
                "an AdapterBank (from lora_jax.stack(adapters))",
                describe(bank),
                "stack the adapters first: bank = lora_jax.stack([lora_0, lora_1, ...])",
                found_is_text=True,
            )
        )
    return bank


def stack(adapters: Sequence[Any], *, params: Any = None) -> AdapterBank:
    """Stack adapters for one base into a bank: their arrays on a new leading axis ``K``.

    Each adapter is written into the bank's serving form: its scale folded into
    ``B`` (so alphas, ranks and rsLoRA may differ), its rank padded with zeros
    to the largest rank at that path (exact: zero columns of ``A`` and rows of
    ``B`` add nothing), and a path it does not target is the identity there
    (``B = 0``). A path where some adapter is DoRA is DoRA in the whole bank:
    the identity there has ``m = ‖W‖`` and a plain LoRA adapter
    ``m = ‖W + s·A·B‖`` (both leave DoRA's rescaling a no-op), which needs
    ``params``. VeRA and AdaLoRA adapters enter through their low-rank form.
    LoRA dropout is not kept: a bank serves. ``B`` is stored in at least
    float32 (``scale·B`` rounded in bfloat16 would change the adapter).

    Args:
      adapters: a non-empty list of adapter trees for the same params.
      params: the base params: checked against the adapters' kernel shapes, and
        needed for DoRA paths that some adapter does not hold as DoRA.

    Returns:
      An :class:`AdapterBank` of ``len(adapters)`` slots.

    Raises:
      TypeError: if ``adapters`` is not a list of adapter trees, or an adapter
        holds a leaf trained in full (``Trainable``).
      ValueError: if the list is empty; if two adapters (or an adapter and the
        params) disagree on a path's kernel shape, layout or kind (naming the
        path and the adapters); if a DoRA path needs ``params`` and none is given.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"q": {"kernel": jnp.ones((4, 4))}, "v": {"kernel": jnp.ones((4, 4))}}
      >>> one = lora_jax.init_lora(jax.random.key(0), params, lora_jax.LoraSpec(rank=2, targets=["q"]))
      >>> two = lora_jax.init_lora(jax.random.key(1), params, lora_jax.LoraSpec(rank=4, alpha=2.0, rslora=True))
      >>> bank = lora_jax.stack([one, two], params=params)
      >>> len(bank), [(f.path, f.rank) for f in bank.forms]
      (2, [('q/kernel', 4), ('v/kernel', 4)])
    """
    where = "stack"
    adapters = _forms.check_adapter_list(adapters, where)
    lowered = [_forms.lowered_adapter(lora, k, where) for k, lora in enumerate(adapters)]
    bases = _forms.base_leaves(params)
    forms = _forms.forms_of(lowered, bases, where)
    if not forms:
        raise ValueError(
            expected(
                f"{where}(adapters=...)",
                "adapters with at least one adapted kernel",
                "no adapted kernel",
                found_is_text=True,
            )
        )
    needed = {} if bases is None else {p: bases[p] for p, f in forms.items() if f.dora and p in bases}
    a, b, m = _stacked(tuple(forms.values()), lowered, needed)
    return AdapterBank(a, b, m, tuple(forms.values()))


@functools.partial(jax.jit, static_argnums=0)
def _stacked(forms: tuple[Form, ...], lowered: list[dict[str, LowRank]], bases: dict[str, Any]) -> tuple[dict, ...]:
    """The bank's arrays (one compiled program per bank layout, not one small program per array op)."""
    arrays: dict[str, dict[str, jax.Array]] = {"a": {}, "b": {}, "m": {}}
    for form in forms:
        path = form.path
        dtypes = serving_dtypes([lows[path] for lows in lowered if path in lows])
        slots = [
            slot(form, lows.get(path), bases.get(path), dtypes, f"stack: adapter {k}") for k, lows in enumerate(lowered)
        ]
        for name in slots[0]:
            arrays[name][path] = jnp.stack([s[name] for s in slots])
    return arrays["a"], arrays["b"], arrays["m"]


@jax.jit
def slot_arrays(bank: AdapterBank, i: Any) -> dict[str, dict[str, jax.Array]]:
    """``{"a": {path: ...}, "b": ..., "m": ...}`` of slot ``i`` (a traced int: NaN arrays where out of range)."""
    size = len(bank)
    i = jnp.asarray(i)
    valid = (i >= 0) & (i < size)
    j = jnp.clip(i, 0, size - 1)

    def take(x: jax.Array) -> jax.Array:
        got = jax.lax.dynamic_index_in_dim(x, j, axis=0, keepdims=False)
        return jnp.where(valid, got, jnp.full((), jnp.nan, got.dtype))

    return {
        "a": {p: take(x) for p, x in bank.a.items()},
        "b": {p: take(x) for p, x in bank.b.items()},
        "m": {p: take(x) for p, x in bank.m.items()},
    }


def serving_tree(forms: tuple[Form, ...], arrays: dict[str, dict[str, jax.Array]]) -> dict[str, Any]:
    """The adapter tree of one slot's arrays: ``LoraWeights`` (``DoraWeights`` on DoRA paths), scale 1.0."""
    nodes: dict[str, Any] = {}
    for form in forms:
        a, b = arrays["a"][form.path], arrays["b"][form.path]
        if form.dora:
            nodes[form.path] = DoraWeights(a, b, arrays["m"][form.path], scale=1.0, layout=form.layout, kind=form.kind)
        else:
            nodes[form.path] = LoraWeights(a, b, scale=1.0, layout=form.layout, kind=form.kind)
    return nest(nodes)


def select(bank: AdapterBank, i: Any) -> dict[str, Any]:
    """Adapter ``i`` of the bank, in the bank's serving form: one adapter tree, the same structure for every ``i``.

    The tree holds ``LoraWeights`` (``DoraWeights`` on the bank's DoRA paths)
    with scale 1.0 (folded into ``B``), rank padded to the bank's, and every
    path of the bank (the identity where adapter ``i`` had no target), so
    ``jax.jit(f)(params, select(bank, i), x)`` traces once for all ``i``.
    ``apply_lora(params, select(bank, i))`` equals
    ``apply_lora(params, adapters[i])`` up to rounding.

    Args:
      bank: from :func:`stack`.
      i: the slot: a Python int (checked: ``0 <= i < len(bank)``) or a traced
        int (under ``jit``: an out-of-range ``i`` gives NaN arrays, so the
        outputs it reaches are NaN, never another slot's).

    Returns:
      An adapter tree, usable with ``apply_lora``, ``factored``, ``merge``, ``save_adapter``, ...

    Raises:
      TypeError: if ``bank`` is not an :class:`AdapterBank` or a concrete ``i`` not an int.
      IndexError: if a concrete ``i`` is out of range.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> loras = [lora_jax.init_lora(jax.random.key(k), params, lora_jax.LoraSpec(rank=k + 1, init="random"))
      ...          for k in range(2)]
      >>> bank = lora_jax.stack(loras)
      >>> node = lora_jax.select(bank, 0)["dense"]["kernel"]
      >>> node.scale, node.rank
      (1.0, 2)
      >>> f = jax.jit(lambda p, lo: lora_jax.apply_lora(p, lo)["dense"]["kernel"])
      >>> bool(jnp.allclose(f(params, lora_jax.select(bank, 0)), f(params, loras[0]), atol=1e-6))
      True
    """
    bank = check_bank(bank, "select")
    if not isinstance(i, jax.core.Tracer):
        i = check_slot(i, len(bank), "select")
    return serving_tree(bank.forms, slot_arrays(bank, i))
