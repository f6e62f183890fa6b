"""``LoraSpec``: the immutable configuration of an adapter."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import jax.numpy as jnp
import numpy as np

from lora_jax.errors._messages import expected
from lora_jax.targets._layout import LAYOUT_LETTERS

#: A target/exclude/trainable selector: a regex string, a sequence of plain
#: key names (or regexes), or a callable ``(path, leaf) -> bool``.
Selector = Union[str, Sequence[str], Callable[[str, Any], bool], None]

INITS = ("kaiming", "gaussian", "random", "pissa", "olora", "orthogonal", "loftq")
#: The inits that change the base weights (``"pissa_niter_N"`` and ``"loftq_iter_N"`` too): made by
#: :func:`lora_jax.init_lora_and_base`.
BASE_INITS = ("pissa", "olora", "loftq")
_NITER = re.compile(r"pissa_niter_([0-9]+)")
_LOFTQ_ITER = re.compile(r"loftq_iter_([1-9][0-9]*)")
#: The adapter dtypes: those every backend computes in and a PEFT file can hold (float8 cannot be read back).
DTYPES = ("float16", "bfloat16", "float32", "float64")
_MAPPING_OF = {"rank_pattern": "{pattern: rank}", "alpha_pattern": "{pattern: alpha}", "axes": "{pattern: layout}"}
_EXAMPLE_OF = {"rank_pattern": "4", "alpha_pattern": "16.0", "axes": "'ioo'"}
_INIT_ALIASES = {"default": "kaiming", "kaiming_uniform": "kaiming"}
#: How ``targets``, ``exclude``, ``trainable``, ``rank_pattern`` and ``alpha_pattern`` match paths.
TARGET_MATCHES = ("lora_jax", "peft")


def _check_regex(where: str, pattern: str) -> None:
    """A selector or pattern key is matched as a regex too: an invalid one is refused here, where it enters."""
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(
            expected(where, "a valid regular expression", pattern, f"{e}; escape literal characters with re.escape")
        ) from None


def _freeze_selector(name: str, value: Any) -> Any:
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        if not (name == "targets" and value == "all-linear"):
            _check_regex(f"LoraSpec({name}=...)", value)
        return value
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        for entry in value:
            _check_regex(f"LoraSpec({name}=[..., {entry!r}, ...])", entry)
        return tuple(value)
    raise TypeError(
        f"LoraSpec({name}=...) must be a regex string, a list of key names, a callable "
        f"(path, leaf) -> bool, or None; found {type(value).__name__}: {value!r}."
    )


def _is_pair(kv: Any) -> bool:
    return isinstance(kv, (tuple, list)) and len(kv) == 2


def _freeze_mapping(name: str, value: Any, check: Callable[[str, Any], None]) -> tuple:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = tuple(value.items())
    elif isinstance(value, (tuple, list)) and all(_is_pair(kv) for kv in value):  # the frozen form, from replace()
        items = tuple(tuple(kv) for kv in value)
    else:
        raise TypeError(
            expected(
                f"LoraSpec({name}=...)",
                f"a dict {_MAPPING_OF[name]}",
                value,
                f"E.g. {name}={{'query': {_EXAMPLE_OF[name]}}}",
            )
        )
    for key, v in items:
        if not isinstance(key, str):
            raise TypeError(f"LoraSpec({name}=...): keys must be pattern strings; found {key!r}.")
        _check_regex(f"LoraSpec({name}={{{key!r}: ...}})", key)
        check(key, v)
    return items


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    """A real number: not a bool and not a string (no coercion), finite."""
    return (
        isinstance(v, (int, float, np.integer, np.floating))
        and not isinstance(v, (bool, np.bool_))
        and math.isfinite(v)
    )


def pissa_niter(init: str) -> int | None:
    """The subspace iterations of ``"pissa_niter_N"`` (randomized SVD), or None for any other init.

    >>> pissa_niter("pissa_niter_4"), pissa_niter("pissa")
    (4, None)
    """
    m = _NITER.fullmatch(init)
    return int(m.group(1)) if m else None


def loftq_iters(init: str) -> int | None:
    """LoftQ's alternating iterations: 1 for ``"loftq"`` (PEFT's default), N for ``"loftq_iter_N"``, else None.

    >>> loftq_iters("loftq"), loftq_iters("loftq_iter_5"), loftq_iters("pissa")
    (1, 5, None)
    """
    if init == "loftq":
        return 1
    m = _LOFTQ_ITER.fullmatch(init)
    return int(m.group(1)) if m else None


def changes_base(init: str) -> bool:
    """Whether ``init`` moves part of the base kernel into the adapter (PiSSA, OLoRA) or requantizes it (LoftQ).

    >>> changes_base("pissa_niter_2"), changes_base("olora"), changes_base("loftq_iter_3"), changes_base("orthogonal")
    (True, True, True, False)
    """
    return init in BASE_INITS or pissa_niter(init) is not None or loftq_iters(init) is not None


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
        B = 0), ``"random"`` (A and B both random: not a no-op, for tests),
        ``"orthogonal"`` (PEFT's: A and B from complementary halves of a
        random orthogonal basis of the rank space, so B·A = 0 up to rounding;
        the rank must be even), or the inits that change the base, made by
        :func:`lora_jax.init_lora_and_base`: ``"pissa"`` (A, B from the top-r
        singular triplets of the kernel, ``scale·A·B`` its rank-r truncation),
        ``"pissa_niter_N"`` (the same from a randomized SVD with N subspace
        iterations), ``"olora"`` (A, B from the kernel's QR decomposition) and
        ``"loftq"`` / ``"loftq_iter_N"`` (LoftQ: the base is quantized, A and B
        fit the quantization error, alternating N times; 1 by default, as PEFT).
        Embedding tables always get A = 0, B ~ N(0, 1), as in PEFT (which
        ignores these inits for embeddings too).
      dtype: dtype of A and B: float16, bfloat16, float32 or float64 (the update is
        computed in float32 regardless).
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
      dora: DoRA (PEFT's ``use_dora``): every adapted kernel also gets a
        magnitude ``m`` per output unit and becomes
        ``(m / n) * (W + s·A·B)``, ``n`` the norm of ``W + s·A·B`` over the
        input axes (a constant in backprop); ``init_lora`` sets ``m = n``
        (a no-op), which needs the kernels' values. See
        :class:`lora_jax.DoraWeights`.
      vera: VeRA (PEFT's ``VeraConfig``): one pair of frozen random
        projections shared by every adapted kernel (in the tree's
        ``"__shared__"`` section) and two trainable vectors per kernel,
        ``d (r)`` and ``b (out)``: ``W' = W + A₀·diag(d)·B₀·diag(b)``. ``b``
        starts at 0 (a no-op) and ``d`` at ``vera_d_initial``; ``alpha`` is not
        used (VeRA has no scale) and every kernel has the one ``rank``. See
        :class:`lora_jax.VeraWeights`.
      vera_d_initial: VeRA's initial ``d`` (PEFT's ``d_initial``, 0.1).
      adalora: AdaLoRA (PEFT's ``AdaLoraConfig``; ``rank`` is its ``init_r``):
        each kernel gets ``a``, ``e``, ``b`` with ``W' = W + s·a·diag(e)·b``,
        ``s = alpha / (r + 1e-5)`` as PEFT's, ``e = 0`` at init. Prune with
        :func:`lora_jax.adalora_allocator`. See :class:`lora_jax.AdaLoraWeights`.
      target_match: how ``targets``, ``exclude``, ``trainable``,
        ``rank_pattern`` and ``alpha_pattern`` match (``axes`` always uses
        lora_jax's rules): ``"lora_jax"`` (the rules above) or ``"peft"``,
        PEFT's rules on module names, for ``target_modules`` pasted from a
        PEFT config (:meth:`from_peft` sets it). A leaf's module name is its
        path without the leaf key, ``"/"`` read as ``"."``
        (``"layers_0/attn/query/kernel"`` is module ``"layers_0.attn.query"``,
        the name :func:`lora_jax.default_name_map` exports). Then a list entry
        matches a module named exactly so or ending in ``"." + entry``
        (``"query"``, ``"attn.query"``); a string full-matches the module name
        (``r".*\\.(query|value)"``); ``trainable`` matches a module and
        everything under it (PEFT's ``modules_to_save``, trained even where
        ``exclude`` matches); a pattern key
        matches a module name ending in it (``re.match(r"(.*\\.)?(key)$")``).
        ``"all-linear"`` means the same in both modes.

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
    dora: bool = False
    vera: bool = False
    vera_d_initial: float = 0.1
    adalora: bool = False
    target_match: str = "lora_jax"

    def __post_init__(self) -> None:
        def put(name, value):
            object.__setattr__(self, name, value)

        if not _is_int(self.rank) or self.rank < 1:
            raise ValueError(expected("LoraSpec(rank=...)", "a positive integer", self.rank, "E.g. rank=8"))
        put("rank", int(self.rank))
        if not _is_real(self.alpha) or self.alpha <= 0:
            raise ValueError(expected("LoraSpec(alpha=...)", "a positive finite number", self.alpha, "E.g. alpha=16.0"))
        put("alpha", float(self.alpha))
        for name in ("targets", "exclude", "trainable"):
            put(name, _freeze_selector(name, getattr(self, name)))
        if self.targets is None:
            raise ValueError("LoraSpec(targets=...) is required: e.g. targets=['query', 'value'] or 'all-linear'.")

        def check_rank(key, v):
            if not _is_int(v) or v < 1:
                raise ValueError(expected(f"LoraSpec(rank_pattern={{{key!r}: ...}})", "a positive integer", v))

        def check_alpha(key, v):
            if not _is_real(v) or v <= 0:
                raise ValueError(expected(f"LoraSpec(alpha_pattern={{{key!r}: ...}})", "a positive finite number", v))

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
        init = _INIT_ALIASES.get(self.init, self.init) if isinstance(self.init, str) else self.init
        if isinstance(init, str) and pissa_niter(init) is not None:
            init = f"pissa_niter_{pissa_niter(init)}"
        elif isinstance(init, str) and init != "loftq" and loftq_iters(init) is not None:
            init = "loftq" if loftq_iters(init) == 1 else f"loftq_iter_{loftq_iters(init)}"
        elif init not in INITS:
            raise ValueError(
                f"LoraSpec(init={self.init!r}) is not a known initialization; expected one of "
                f"{', '.join(repr(i) for i in INITS)}, 'pissa_niter_N' (N subspace iterations, e.g. "
                f"'pissa_niter_4'), 'loftq_iter_N' (N >= 1 LoftQ iterations) or 'default' for 'kaiming'."
            )
        put("init", init)
        if init == "orthogonal":
            odd = [("rank", self.rank)] * (self.rank % 2) + [
                (f"rank_pattern={{{k!r}: ...}}", r) for k, r in self.rank_pattern if r % 2
            ]
            if odd:
                where, r = odd[0]
                raise ValueError(
                    expected(
                        f"LoraSpec({where}) with init='orthogonal'",
                        "an even rank (A and B take complementary halves of an orthogonal basis of the rank space)",
                        r,
                        f"E.g. rank={r + 1}",
                    )
                )
        allowed = ", ".join(DTYPES)
        try:
            dtype = jnp.dtype(self.dtype)
        except TypeError:
            raise TypeError(
                expected("LoraSpec(dtype=...)", f"a dtype (one of {allowed})", self.dtype, "E.g. dtype='bfloat16'")
            ) from None
        if dtype.name not in DTYPES:
            raise ValueError(
                expected(
                    "LoraSpec(dtype=...)",
                    f"one of {allowed}",
                    dtype.name,
                    "Adapters are stored, exported to PEFT and read back in these dtypes",
                    found_is_text=True,
                )
            )
        put("dtype", dtype.name)
        if not _is_real(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(expected("LoraSpec(dropout=...)", "a number in [0, 1)", self.dropout, "E.g. dropout=0.1"))
        put("dropout", float(self.dropout))
        for name in ("rslora", "freeze_a", "dora", "vera", "adalora"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(
                    expected(
                        f"LoraSpec({name}=...)",
                        "True or False",
                        value,
                        f"Write {name}=True or {name}=False (a string such as 'false' is not read as a bool)",
                    )
                )
            put(name, bool(value))
        if self.target_match not in TARGET_MATCHES:
            raise ValueError(
                expected(
                    "LoraSpec(target_match=...)",
                    f"one of {', '.join(map(repr, TARGET_MATCHES))}",
                    self.target_match,
                    "'peft' matches targets as PEFT's target_modules does (module names by suffix)",
                )
            )
        if not _is_real(self.vera_d_initial):
            raise ValueError(expected("LoraSpec(vera_d_initial=...)", "a finite number", self.vera_d_initial))
        put("vera_d_initial", float(self.vera_d_initial))
        if self.adalora and (self.vera or self.dora or self.freeze_a or self.rslora):
            raise ValueError(
                "LoraSpec(adalora=True) cannot be combined with vera, dora, freeze_a or rslora (PEFT's AdaLoRA has "
                "none of them)."
            )
        if self.vera:
            clash = [n for n in ("dora", "freeze_a", "rslora") if getattr(self, n)]
            clash += ["rank_pattern"] * bool(self.rank_pattern) + ["alpha_pattern"] * bool(self.alpha_pattern)
            if clash or self.init != "kaiming":
                what = clash[0] if clash else f"init={self.init!r}"
                raise ValueError(
                    expected(
                        "LoraSpec(vera=True)",
                        "no dora, freeze_a, rslora, rank_pattern, alpha_pattern or init other than 'kaiming'",
                        what,
                        "VeRA shares one pair of rank-r projections across the model and trains d and b only",
                        found_is_text=True,
                    )
                )

    def scale_for(self, rank: int, alpha: float) -> float:
        """The update scale for one kernel: ``alpha/r``, or ``alpha/sqrt(r)`` with rslora."""
        return lora_scale(rank, alpha, rslora=self.rslora)

    @classmethod
    def from_peft(cls, config: Any, **lora_jax_fields: Any) -> LoraSpec:
        """The spec of a PEFT ``LoraConfig``: an ``adapter_config.json`` path (or its directory), a dict or the object.

        ``target_modules`` keep PEFT's meaning (``target_match="peft"``). The
        fields PEFT has no word for (``axes``, ``dtype``, ``freeze_a``) are
        given as keywords. Options lora_jax does not support (``bias``,
        ``layers_to_transform``, ``init_lora_weights="eva"``, ...) raise
        ValueError naming the option. See :mod:`lora_jax.spec._peft_config`.

        >>> spec = LoraSpec.from_peft({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]})
        >>> spec.rank, spec.alpha, spec.targets, spec.target_match
        (4, 8.0, ('q_proj', 'v_proj'), 'peft')
        """
        from lora_jax.spec._peft_config import spec_from_peft

        return spec_from_peft(config, **lora_jax_fields)

    def to_peft(self, *, task_type: str | None = None, base_model_name_or_path: str | None = None) -> dict[str, Any]:
        """A dict ``peft.LoraConfig(**d)`` accepts (and :meth:`from_peft` reads back); see :mod:`lora_jax.spec._peft_config`.

        >>> d = LoraSpec(rank=4, alpha=8.0, targets=["q_proj"], target_match="peft").to_peft()
        >>> d["r"], d["lora_alpha"], d["target_modules"], d["init_lora_weights"]
        (4, 8, ['q_proj'], True)
        """
        from lora_jax.spec._peft_config import spec_to_peft

        return spec_to_peft(self, task_type=task_type, base_model_name_or_path=base_model_name_or_path)

    def replace(self, **changes: Any) -> LoraSpec:
        """A copy with some fields changed (validated again).

        >>> LoraSpec(rank=4).replace(rank=16).rank
        16
        """
        return dataclasses.replace(self, **changes)
