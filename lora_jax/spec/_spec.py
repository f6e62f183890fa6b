"""``LoraSpec``: the immutable configuration of an adapter."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax.numpy as jnp
import numpy as np

from lora_jax.targets._layout import LAYOUT_LETTERS

#: A target/exclude/trainable selector: a regex string, a sequence of plain
#: key names (or regexes), or a callable ``(path, leaf) -> bool``.
Selector = Union[str, Sequence[str], Callable[[str, Any], bool], None]

INITS = ("kaiming", "gaussian", "random")
_INIT_ALIASES = {"default": "kaiming", "kaiming_uniform": "kaiming"}


def _freeze_selector(name: str, value: Any) -> Any:
    if value is None or callable(value) or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise TypeError(
        f"LoraSpec({name}=...) must be a regex string, a list of key names, a callable "
        f"(path, leaf) -> bool, or None; found {type(value).__name__}: {value!r}."
    )


def _freeze_mapping(name: str, value: Any, check: Callable[[str, Any], None]) -> tuple:
    if value is None:
        return ()
    items = tuple(value.items()) if isinstance(value, Mapping) else tuple(tuple(kv) for kv in value)
    for key, v in items:
        if not isinstance(key, str):
            raise TypeError(f"LoraSpec({name}=...): keys must be pattern strings; found {key!r}.")
        check(key, v)
    return items


def lora_scale(rank: int, alpha: float, *, rslora: bool) -> float:
    """``alpha / r``, or ``alpha / sqrt(r)`` for rank-stabilized LoRA.

    >>> lora_scale(4, 8.0, rslora=False), lora_scale(4, 8.0, rslora=True)
    (2.0, 4.0)
    """
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which kernels get a low-rank adapter, and how.

    Attributes:
      rank: LoRA rank ``r``.
      alpha: scaling numerator; the update is ``(alpha / r) * A @ B`` (or
        ``alpha / sqrt(r)`` with ``rslora``).
      targets: which kernels to adapt. A regex string that full-matches a leaf's
        path (``"encoder/layer_0/query/kernel"``) or its module path
        (``"encoder/layer_0/query"``); a list of plain names such as
        ``["query", "value"]`` that match any key on a path (each entry may also
        be a regex); a callable ``(path, leaf) -> bool``; or ``"all-linear"``:
        every float kernel with 2+ axes except embeddings and output heads.
      exclude: paths never adapted, written like ``targets``.
      rank_pattern: per-path rank overrides ``{pattern: rank}``; the first
        matching pattern wins.
      alpha_pattern: per-path alpha overrides ``{pattern: alpha}``.
      rslora: scale by ``alpha / sqrt(r)`` (rank-stabilized LoRA).
      init: ``"kaiming"`` (PEFT's default: A kaiming-uniform with a=sqrt(5),
        B = 0; alias ``"default"``), ``"gaussian"`` (A ~ N(0, (1/r)^2),
        B = 0), or ``"random"`` (A and B both random: not a no-op, for tests).
        Embedding tables always get A = 0, B ~ N(0, 1), as in PEFT.
      dtype: dtype of A and B (the update is computed in float32 regardless).
      axes: per-path kernel layouts ``{pattern: layout}``, required for kernels
        with more than two axes; see :mod:`lora_jax.targets._layout` (e.g. ``"ioo"``
        for a ``(d_model, heads, head_dim)`` query kernel, ``"bio"`` for a
        scanned Dense kernel, ``"iiio"`` for Conv2D).
      trainable: leaves trained in full (PEFT's ``modules_to_save``, e.g. a
        classifier head), written like ``targets``. Takes precedence over
        ``targets``.
      dropout: LoRA dropout rate on the adapter input. Every adapter records
        it; :func:`lora_jax.factored` applies it when given a ``dropout_rng``
        (and raises without one unless told the call is deterministic);
        :func:`lora_jax.apply_lora` is the deterministic path.
      freeze_a: LoRA-FA: A stays at its random init and only B trains. A is a
        frozen array of the adapter (see :func:`lora_jax.split`).

    Example:
      >>> spec = LoraSpec(rank=4, alpha=8.0, targets=["query", "value"])
      >>> spec.scale_for(4, 8.0)
      2.0
      >>> LoraSpec(rank=4, alpha=8.0, rslora=True).scale_for(4, 8.0)
      4.0
    """

    rank: int = 8
    alpha: float = 8.0
    targets: Selector = "all-linear"
    exclude: Selector = None
    rank_pattern: Any = ()
    alpha_pattern: Any = ()
    rslora: bool = False
    init: str = "kaiming"
    dtype: Any = "float32"
    axes: Any = ()
    trainable: Selector = None
    dropout: float = 0.0
    freeze_a: bool = False

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.rank, (int, np.integer)) or isinstance(self.rank, bool) or self.rank < 1:
            raise ValueError(f"LoraSpec(rank=...) must be a positive integer; found {self.rank!r}.")
        put("rank", int(self.rank))
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float, np.number))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise ValueError(f"LoraSpec(alpha=...) must be a positive finite number; found {self.alpha!r}.")
        put("alpha", float(self.alpha))
        for name in ("targets", "exclude", "trainable"):
            put(name, _freeze_selector(name, getattr(self, name)))
        if self.targets is None:
            raise ValueError("LoraSpec(targets=...) is required: e.g. targets=['query', 'value'] or 'all-linear'.")

        def check_rank(key, v):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise ValueError(f"LoraSpec(rank_pattern={{{key!r}: ...}}) must be a positive integer; found {v!r}.")

        def check_alpha(key, v):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.number)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"LoraSpec(alpha_pattern={{{key!r}: ...}}) must be a positive number; found {v!r}.")

        def check_axes(key, v):
            if not isinstance(v, str) or not v or set(v) - LAYOUT_LETTERS:
                raise ValueError(
                    f"LoraSpec(axes={{{key!r}: {v!r}}}): a layout is a string of 'b' (stacked-layer axis), "
                    f"'i' (input axis) and 'o' (output axis), one letter per kernel axis, e.g. 'ioo'."
                )

        put(
            "rank_pattern",
            tuple((k, int(v)) for k, v in _freeze_mapping("rank_pattern", self.rank_pattern, check_rank)),
        )
        put(
            "alpha_pattern",
            tuple((k, float(v)) for k, v in _freeze_mapping("alpha_pattern", self.alpha_pattern, check_alpha)),
        )
        put("axes", _freeze_mapping("axes", self.axes, check_axes))
        init = _INIT_ALIASES.get(self.init, self.init)
        if init not in INITS:
            raise ValueError(
                f"LoraSpec(init={self.init!r}) is not a known initialization; expected one of "
                f"{', '.join(repr(i) for i in INITS)} (or 'default' for 'kaiming')."
            )
        put("init", init)
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError as e:
            raise TypeError(f"LoraSpec(dtype={self.dtype!r}) is not a dtype.") from e
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"LoraSpec(dtype=...) must be a floating dtype such as 'float32'; found {dtype}.")
        put("dtype", dtype.name)
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"LoraSpec(dropout=...) must be in [0, 1); found {self.dropout!r}.")
        put("dropout", float(self.dropout))
        for name in ("rslora", "freeze_a"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise TypeError(
                    f"LoraSpec({name}=...) must be True or False; found {type(getattr(self, name)).__name__} "
                    f"{getattr(self, name)!r} (a string such as 'false' is not read as a bool)."
                )
            put(name, bool(getattr(self, name)))

    def scale_for(self, rank: int, alpha: float) -> float:
        """The update scale for one kernel: ``alpha/r``, or ``alpha/sqrt(r)`` with rslora."""
        return lora_scale(rank, alpha, rslora=self.rslora)

    def replace(self, **changes: Any) -> LoraSpec:
        """A copy with some fields changed (validated again).

        >>> LoraSpec(rank=4).replace(rank=16).rank
        16
        """
        return dataclasses.replace(self, **changes)
