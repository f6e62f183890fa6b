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


def test_eager_factored_calls_trace_the_model_once_per_shape():
    from lora_jax import factored

    calls = []

    def model(p, x, *, flag):
        y = jnp.einsum("td,dhk->thk", x, p["enc"]["query"]["kernel"]).reshape(x.shape[0], -1) @ jnp.ones((8, 3))
        return y + (x @ p["enc"]["mlp"]["kernel"]).sum() if flag else y

    def counted(p, x, *, flag):
        calls.append(flag)  # Python code of the model: runs only while tracing
        return model(p, x, flag=flag)

    fac = factored(counted)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 8)), jnp.float32)
    for seed in (1, 2, 3):
        lora = adapters(seed)
        want = model(apply_lora(PARAMS, lora), x, flag=True)
        np.testing.assert_allclose(fac(PARAMS, lora, x, flag=True), want, rtol=1e-5, atol=1e-5)
    assert calls == [True]  # one trace for three adapters
    fac(PARAMS, adapters(1), x, flag=False)  # a new static argument traces again
    fac(PARAMS, adapters(1), x[:4], flag=False)  # so does a new shape
    assert calls == [True, False, False]


def test_eager_factored_call_with_an_unhashable_argument_runs_op_by_op():
    from lora_jax import factored

    class Options:  # not a pytree and not hashable: cannot be a static argument of jit
        __hash__ = None
        gain = 2.0

    model = lambda p, x, opts: x @ p["enc"]["mlp"]["kernel"] * opts.gain  # noqa: E731
    x = jnp.ones((2, 8))
    got = factored(model)(PARAMS, adapters(1), x, Options())
    np.testing.assert_allclose(got, model(apply_lora(PARAMS, adapters(1)), x, Options()), rtol=1e-6)
