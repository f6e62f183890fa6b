"""Running a module's method on adapted Params: the one function :func:`with_lora` and :func:`functional` share.

``run_method(graphdef, method, strategy)`` is pure: ``(params, lora, rest, *args, **kwargs) -> (out, rest)``.
The module is rebuilt from copies (``nnx.merge(..., copy=True)``), so neither the caller's ``rest`` nor any
module outside is written to; what the method changed in the rest (rng counts, caches, batch stats) comes back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from lora_jax.errors._messages import expected
from lora_jax.factored._interpreter import factored
from lora_jax.transforms._apply import apply_lora

STRATEGIES = ("auto", "factored", "dense")


def check_strategy(where: str, strategy: Any) -> None:
    """Raise ``ValueError`` unless ``strategy`` is ``None`` (apply_lora) or one of :func:`lora_jax.factored`'s."""
    if strategy is not None and strategy not in STRATEGIES:
        raise ValueError(
            expected(
                f"{where}(strategy=...)",
                f"None (the adapted weights formed once, as apply_lora) or one of {', '.join(map(repr, STRATEGIES))}",
                strategy,
                "see lora_jax.factored for what each strategy computes",
            )
        )


def check_method(where: str, module: nnx.Module, method: str) -> None:
    """Raise ``AttributeError`` unless ``module`` has a callable named ``method``."""
    if not callable(getattr(module, method, None)):
        raise AttributeError(
            expected(
                f"{where}(method=...)",
                f"the name of a method of {type(module).__name__}",
                method,
                "pass e.g. method='__call__' (the default) or method='decode'",
            )
        )


def _call(graphdef: nnx.GraphDef, method: str, params: Any, rest: Any, args: tuple, kwargs: dict) -> tuple[Any, Any]:
    module = nnx.merge(graphdef, params, rest, copy=True)
    out = getattr(module, method)(*args, **kwargs)
    return out, nnx.state(module, nnx.Not(nnx.Param))


_UNHASHABLE: list = []  # ((method, strategy, deterministic), (graphdef, runner)), the latest 64


def run_method(
    graphdef: nnx.GraphDef, method: str, strategy: str | None, deterministic: bool = False
) -> Callable[..., tuple[Any, Any]]:
    """``(params, lora, rest, *args, dropout_rng=None, **kwargs) -> (out, new_rest)`` for ``graphdef.method``.

    Cached per (graph, method, strategy, deterministic): repeated eager calls reuse one :func:`lora_jax.factored`
    wrapper and so its compiled program (a wrapper made per call would compile at every call). A graph that cannot
    be hashed (a module holding an unhashable static attribute, e.g. tunix's Gemma and Qwen3 with their non-frozen
    ``ModelConfig``) is cached in a short list searched by equality. ``deterministic``: no LoRA dropout
    (``factored(..., deterministic=True)``; apply_lora never applies it).
    """
    try:
        hash(graphdef)
    except TypeError:
        return _unhashable_runner(graphdef, method, strategy, deterministic)
    return _cached_runner(graphdef, method, strategy, deterministic)


def _unhashable_runner(graphdef: nnx.GraphDef, method: str, strategy: str | None, deterministic: bool) -> Any:
    """The runner of an unhashable graph: the cached one of the same or an equal graph, else a new one."""
    key = (method, strategy, deterministic)
    for cached_key, (cached, run) in _UNHASHABLE:
        if cached_key == key and (cached is graphdef or _equal(cached, graphdef)):
            return run
    run = _make_runner(graphdef, method, strategy, deterministic)
    _UNHASHABLE.append((key, (graphdef, run)))
    del _UNHASHABLE[:-64]
    return run


def _equal(a: nnx.GraphDef, b: nnx.GraphDef) -> bool:
    try:
        return bool(a == b)
    except Exception:  # an attribute whose == is not a bool (an array)
        return False


@functools.lru_cache(maxsize=64)
def _cached_runner(graphdef: nnx.GraphDef, method: str, strategy: str | None, deterministic: bool) -> Any:
    return _make_runner(graphdef, method, strategy, deterministic)


def _make_runner(graphdef: nnx.GraphDef, method: str, strategy: str | None, deterministic: bool) -> Any:
    """The runner itself (see :func:`run_method`)."""
    if strategy is None:

        def run(params: Any, lora: Any, rest: Any, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any):
            if dropout_rng is not None:
                raise ValueError(
                    expected(
                        "dropout_rng",
                        "None when strategy is None (apply_lora applies no LoRA dropout)",
                        "a key",
                        "pass strategy='auto' to train with LoRA dropout through lora_jax.factored",
                        found_is_text=True,
                    )
                )
            return _call(graphdef, method, apply_lora(params, lora), rest, args, kwargs)

        return run
    inner = factored(
        lambda p, rest, *a, **k: _call(graphdef, method, p, rest, a, k), strategy=strategy, deterministic=deterministic
    )

    def run_factored(params: Any, lora: Any, rest: Any, *args: Any, dropout_rng: jax.Array | None = None, **kwargs):
        return inner(params, lora, rest, *args, dropout_rng=dropout_rng, **kwargs)

    run_factored.explain = lambda params, lora, rest, *a, **k: inner.explain(params, lora, rest, *a, **k)
    return run_factored
