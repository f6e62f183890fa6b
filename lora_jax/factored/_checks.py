"""What :func:`lora_jax.factored` checks before it runs: its arguments, the call's, and how ``fn`` reads its weights.

A function that closes over the params instead of taking them as its first
argument runs the base model and gives the adapters zero gradients; the traced
jaxpr shows it: an adapted leaf among its constants, or no adapted kernel read
at all. Both raise here, at the first call (or ``explain``).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from lora_jax.adapters._registry import SHARED, is_adapter, is_node_like, node_type
from lora_jax.adapters._tree import lowered_items
from lora_jax.errors._messages import expected
from lora_jax.targets._paths import flatten_with_paths, is_base_leaf, path_str

_CALL = "factored(fn)(params, lora, ...)"


def check_wrapper_args(fn: Any, materialize: Any, on_materialize: Any, deterministic: Any) -> tuple[str, ...]:
    """The ``materialize`` entries as a tuple, after checking every argument of :func:`factored`."""
    if not callable(fn):
        hint = "write factored(fn)(params, lora, *args), with fn(params, *args) the model function"
        raise TypeError(expected("factored(fn)", "a function fn(params, *args)", fn, hint))
    if isinstance(materialize, str):
        materialize = (materialize,)
    if not isinstance(materialize, Iterable):
        hint = "pass a list of parameter paths or regexes, e.g. materialize=['dense/kernel']"
        raise TypeError(
            expected("factored(materialize=...)", "a parameter path, a regex or a list of them", materialize, hint)
        )
    materialize = tuple(materialize)
    for i, entry in enumerate(materialize):
        where = f"factored(materialize=...)[{i}]"
        if not isinstance(entry, str):
            raise TypeError(expected(where, "a parameter path or regex (a str)", entry, "write e.g. 'dense/kernel'"))
        try:
            re.compile(entry)
        except re.error as e:
            hint = f"fix the regex, or escape it with re.escape({entry!r}) to match the path literally"
            raise ValueError(expected(where, "a valid regex", f"{entry!r} ({e})", hint, found_is_text=True)) from None
    if on_materialize is not None and not callable(on_materialize):
        hint = "pass a function on_materialize(path, primitive), or None"
        raise TypeError(expected("factored(on_materialize=...)", "a callable or None", on_materialize, hint))
    if not isinstance(deterministic, bool):
        hint = "write deterministic=True to evaluate without dropout"
        raise TypeError(expected("factored(deterministic=...)", "True or False", deterministic, hint))
    return materialize


def check_call(params: Any, lora: Any) -> None:
    """Refuse swapped or non-adapter arguments with a message about the call, before anything is traced."""
    if any(is_adapter(x) for x in jax.tree_util.tree_leaves(params, is_leaf=is_adapter)):
        raise TypeError(
            expected(
                f"{_CALL}: params",
                "the base params (arrays)",
                "an adapter tree (LoraWeights nodes)",
                "pass the base params first and the adapter tree second",
                found_is_text=True,
            )
        )
    if not isinstance(lora, Mapping):
        hint = "pass the adapter tree made by init_lora (or load_adapter / import_peft) second"
        raise TypeError(expected(f"{_CALL}: lora", "an adapter tree (a dict of adapter nodes)", lora, hint))
    body = {k: v for k, v in lora.items() if k != SHARED}
    for path, leaf in flatten_with_paths(body, is_leaf=is_node_like).items():
        if is_node_like(leaf):
            node_type(leaf, path)  # a subclass of a node type raises here, naming it
        elif leaf is not None:
            raise TypeError(
                expected(
                    f"{_CALL}: lora at {path}",
                    "an adapter node (LoraWeights, Trainable or a registered variant, as made by init_lora)",
                    leaf,
                    "pass the base params first and the adapter tree second",
                )
            )


def check_dropout_rng(dropout_rng: Any) -> None:
    """A PRNG key: a typed key of shape ``()`` (``jax.random.key``) or raw ``uint32`` data of shape ``(2,)``."""
    if dropout_rng is None:
        return
    dtype, shape = getattr(dropout_rng, "dtype", None), getattr(dropout_rng, "shape", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and tuple(shape) == ()
    raw = dtype is not None and dtype == jnp.uint32 and tuple(shape) in ((2,), (4,))  # legacy raw key data
    if not (typed or raw):
        hint = "pass dropout_rng=jax.random.key(seed) (under vmap, one key per call)"
        raise TypeError(expected(f"{_CALL}: dropout_rng", "a PRNG key of shape ()", dropout_rng, hint))


def check_materialize_matches(materialize: tuple[str, ...], paths: list[str]) -> None:
    """Every ``materialize`` entry names (or full-matches) at least one adapted kernel: a typo would be ignored."""
    for i, entry in enumerate(materialize):
        if any(entry == p or re.fullmatch(entry, p) for p in paths):
            continue
        near = difflib.get_close_matches(entry, paths, n=3, cutoff=0.0)
        hint = f"nearest adapted paths: {', '.join(near) or 'none (the adapter adapts no kernel)'}"
        found = f"{entry!r}, which matches none of the {len(paths)} adapted kernel path(s)"
        raise ValueError(
            expected(
                f"factored(materialize=...)[{i}]",
                "an adapted kernel's path or a regex full-matching one",
                found,
                hint,
                found_is_text=True,
            )
        )


def _all_consts(jaxpr: Any, consts: Iterable[Any]) -> list[Any]:
    """The constants of a jaxpr and of every jaxpr nested in its equations' parameters."""
    out, stack = list(consts), [jaxpr]
    while stack:
        for eqn in stack.pop().eqns:
            for p in jax.tree_util.tree_leaves(list(eqn.params.values()), is_leaf=_is_jaxpr):
                if isinstance(p, jcore.ClosedJaxpr):
                    out += list(p.consts)
                    stack.append(p.jaxpr)
                elif isinstance(p, jcore.Jaxpr):
                    stack.append(p)
    return out


def _is_jaxpr(x: Any) -> bool:
    return isinstance(x, (jcore.ClosedJaxpr, jcore.Jaxpr))


def check_reads(
    jaxpr: Any, consts: list[Any], adapted: Mapping[int, str], originals: Mapping[int, str], *, some: bool = True
) -> None:
    """Refuse a ``fn`` that does not read its adapted kernels from its first argument.

    Args:
      jaxpr: ``fn`` traced with the parameter leaves as its first inputs.
      consts: the jaxpr's constants.
      adapted: the input position of every adapted leaf, with its path.
      originals: ``id`` of every concrete adapted params leaf, with its path (empty under a transformation).
      some: also refuse a ``fn`` that reads none of the adapted kernels (``explain`` reports that instead).
    """
    read = {v for eqn in jaxpr.eqns for v in eqn.invars if not isinstance(v, jcore.Literal)}
    read |= {v for v in jaxpr.outvars if not isinstance(v, jcore.Literal)}
    unread = {p for i, p in adapted.items() if jaxpr.invars[i] not in read}
    # a closed-over kernel is an error only where fn does not also read it from its argument: a reference model
    # built from the same base params (DPO, KL to the base, distillation) reads both, and is fine
    closed = sorted({originals[id(c)] for c in _all_consts(jaxpr, consts) if id(c) in originals} & unread)
    if closed:
        shown = ", ".join(closed[:3]) + (", ..." if len(closed) > 3 else "")
        raise ValueError(
            expected(
                "factored(fn)",
                "fn(params, *args) to read its weights from its first argument",
                f"fn closes over the params: the adapted kernel(s) {shown} enter as constants, so the base runs "
                "and the adapters would get zero gradients",
                "use the params fn is given, e.g. fn = lambda p, x: model.apply({'params': p}, x)",
                found_is_text=True,
            )
        )
    if not adapted or not some:
        return
    if not any(jaxpr.invars[i] in read for i in adapted):
        paths = list(adapted.values())
        shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise ValueError(
            expected(
                "factored(fn)",
                "fn(params, *args) to read its weights from its first argument",
                f"fn uses none of the adapted kernels ({shown}): the adapters would get zero gradients",
                "make fn read the kernels from the params it is given (not from a closure or a global), or check "
                "that LoraSpec(targets=...) names kernels this function uses",
                found_is_text=True,
            )
        )


def check_fn_reads(jaxpr: Any, consts: list[Any], params: Any, lora: Any, *, some: bool = True) -> None:
    """:func:`check_reads` for ``fn`` traced with the leaves of ``params`` as its first inputs."""
    items = lowered_items(lora)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_base_leaf)[0]  # a quantized kernel: one input
    paths = [path_str(kp) for kp, _ in flat]
    adapted = {i: p for i, p in enumerate(paths) if p in items}
    originals = {
        id(leaf): p
        for (_, leaf), p in zip(flat, paths, strict=True)
        if p in items and not isinstance(leaf, jax.core.Tracer)
    }
    check_reads(jaxpr, consts, adapted, originals, some=some)
