"""Swapping one adapter for another of the same shapes reuses the compiled code."""

from __future__ import annotations

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _small_models import random_like

from lora_jax import LoraSpec, apply_lora, init_lora, merge, unmerge

PARAMS = {
    "enc": {"query": {"kernel": jnp.ones((8, 2, 4))}, "mlp": {"kernel": jnp.ones((8, 16)), "bias": jnp.zeros(16)}}
}
SPEC = LoraSpec(rank=2, alpha=4.0, targets=["query", "mlp"], axes={"query": "ioo"})


def adapters(seed: int):
    shapes = jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, SPEC), PARAMS)
    return random_like(shapes, seed=seed)


@pytest.fixture(autouse=True)
def _fresh_trace_counters():
    chex.clear_trace_counter()
    yield
    chex.clear_trace_counter()


def test_swapping_adapters_under_jit_does_not_retrace():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def forward(params, lora, x):
        w = apply_lora(params, lora)["enc"]["mlp"]["kernel"]
        return x @ w

    x = jnp.ones((3, 8))
    outs = [forward(PARAMS, adapters(seed), x) for seed in (1, 2, 3)]  # a second trace would raise
    assert not np.allclose(outs[0], outs[1])


def test_a_different_shape_does_retrace_so_the_counter_is_live():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def effective(params, lora):
        return apply_lora(params, lora)

    effective(PARAMS, adapters(1))
    wider = jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, SPEC.replace(rank=3)), PARAMS)
    with pytest.raises(AssertionError, match="traced > 1 times"):
        effective(PARAMS, random_like(wider))


def test_repeated_merge_and_unmerge_compile_once(caplog):
    merge(PARAMS, adapters(1))
    merge(PARAMS, adapters(1), safe=True)
    unmerge(PARAMS, adapters(1))
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        caplog.clear()
        for seed in (2, 3):
            unmerge(merge(PARAMS, adapters(seed)), adapters(seed))
            merge(PARAMS, adapters(seed), safe=True)
    assert any("Finished tracing" in r.getMessage() for r in caplog.records)  # the log is captured
    compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiles == []


def _compiles(caplog, fn):
    """The XLA compiles that ``fn()`` triggers (jax.log_compiles)."""
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        caplog.clear()
        fn()
    return [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


def test_eager_factored_calls_compile_once_per_shape_and_static_args(caplog):
    """fn is traced at every eager call (so nothing it closes over goes stale); XLA compiles once per program."""
    from lora_jax import factored

    def model(p, x, *, flag):
        y = jnp.einsum("td,dhk->thk", x, p["enc"]["query"]["kernel"]).reshape(x.shape[0], -1) @ jnp.ones((8, 3))
        return y + (x @ p["enc"]["mlp"]["kernel"]).sum() if flag else y

    fac = factored(model)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    wants = [model(apply_lora(PARAMS, adapters(seed)), x, flag=True) for seed in (1, 2, 3)]
    assert _compiles(caplog, lambda: fac(PARAMS, adapters(1), x, flag=True))  # the first call compiles
    for seed, want in zip((1, 2, 3), wants, strict=True):
        got = []
        assert _compiles(caplog, lambda s=seed, got=got: got.append(fac(PARAMS, adapters(s), x, flag=True))) == []
        np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-5)
    assert _compiles(caplog, lambda: fac(PARAMS, adapters(1), x, flag=False))  # a new static argument compiles
    assert _compiles(caplog, lambda: fac(PARAMS, adapters(1), x[:4], flag=False))  # so does a new shape
    assert _compiles(caplog, lambda: fac(PARAMS, adapters(2), x[:4], flag=False)) == []


def test_eager_factored_call_reads_the_arrays_fn_closes_over_now(caplog):
    from lora_jax import factored

    held = {"shift": jnp.zeros(16), "table": jnp.zeros(16)}
    lookup = jax.jit(lambda i: held["table"][i])  # a closed-over array inside an inner jit: a nested constant
    model = lambda p, x: x @ p["enc"]["mlp"]["kernel"] + held["shift"] + lookup(3)  # noqa: E731
    fac, lora, x = factored(model), adapters(1), jnp.ones((2, 8))
    fac(PARAMS, lora, x)
    held["shift"] = jnp.full(16, 100.0, jnp.float32)  # a new array, same shape: no new compile needed, but a new value
    assert _compiles(caplog, lambda: fac(PARAMS, lora, x)) == []
    np.testing.assert_allclose(fac(PARAMS, lora, x), model(apply_lora(PARAMS, lora), x), rtol=1e-6)
    held["table"] = jnp.full(16, 7.0, jnp.float32)
    lookup = jax.jit(lambda i: held["table"][i])  # a new inner jit (jax.jit itself caches its trace)
    np.testing.assert_allclose(fac(PARAMS, lora, x), model(apply_lora(PARAMS, lora), x), rtol=1e-6)


def test_eager_factored_call_reads_the_python_state_fn_closes_over_now():
    from lora_jax import factored

    flags = {"negate": False}
    model = lambda p, x: -(x @ p["enc"]["mlp"]["kernel"]) if flags["negate"] else x @ p["enc"]["mlp"]["kernel"]  # noqa: E731
    fac, lora, x = factored(model), adapters(1), jnp.ones((2, 8))
    before = fac(PARAMS, lora, x)
    flags["negate"] = True
    np.testing.assert_allclose(fac(PARAMS, lora, x), -before, rtol=1e-6)
    flags["negate"] = False
    np.testing.assert_allclose(fac(PARAMS, lora, x), before, rtol=1e-6)


def test_eager_factored_call_with_an_unhashable_argument_runs_op_by_op():
    from lora_jax import factored

    class Options:  # not a pytree and not hashable: cannot be a static argument of jit
        __hash__ = None
        gain = 2.0

    model = lambda p, x, opts: x @ p["enc"]["mlp"]["kernel"] * opts.gain  # noqa: E731
    x = jnp.ones((2, 8))
    got = factored(model)(PARAMS, adapters(1), x, Options())
    np.testing.assert_allclose(got, model(apply_lora(PARAMS, adapters(1)), x, Options()), rtol=1e-6)
