"""LoftQ (``LoraSpec(init="loftq")`` with ``init_lora_and_base``): a quantized base and an adapter fitting its error.

Checked against float64 NumPy: the adapter is the rank-r truncated SVD of what the quantized base misses (the
scale applied once), ``W - (Q + s·B·A)`` is below NF4's own error and never rises from one iteration to the next;
the first iteration's base is exactly ``lora_jax.quantize``'s; the result trains under ``factored``.
"""

from __future__ import annotations

import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_jax


def _kernel(shape=(256, 128), rank=8, seed=0):
    """Weights like a pretrained model's: a few strong directions over noise (what LoftQ is meant for)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
    low = jax.random.normal(k1, (fan_in, rank)) @ jax.random.normal(k2, (rank, fan_out)) / rank
    return (0.05 * jax.random.normal(k3, (fan_in, fan_out)) + 0.1 * low).reshape(shape)


W = _kernel()
PARAMS = {"dense": {"kernel": W, "bias": jnp.zeros(128)}}


def _spec(iters=1, **kw):
    init = "loftq" if iters == 1 else f"loftq_iter_{iters}"
    return lora_jax.LoraSpec(**{"rank": 8, "alpha": 16.0, "targets": ["dense"], "init": init, **kw})


def _error(params, base, lora, path=("dense", "kernel")) -> float:
    eff = lora_jax.apply_lora(base, lora)
    w, e = params, eff
    for k in path:
        w, e = w[k], e[k]
    return float(np.linalg.norm(np.asarray(w, np.float64) - np.asarray(e, np.float64)))


def test_the_error_is_below_nf4s_own_and_never_rises_from_one_iteration_to_the_next():
    nf4 = float(
        np.linalg.norm(
            np.asarray(W, np.float64)
            - np.asarray(lora_jax.dequantize(lora_jax.quantize(PARAMS))["dense"]["kernel"], np.float64)
        )
    )
    errors = []
    for iters in range(1, 6):
        base, lora = lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, _spec(iters))
        assert isinstance(base["dense"]["kernel"], lora_jax.QuantizedKernel)
        assert base["dense"]["bias"] is PARAMS["dense"]["bias"]
        errors.append(_error(PARAMS, base, lora))
    assert errors[0] < 0.95 * nf4, (errors, nf4)
    assert all(b <= a for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0]


def test_the_adapter_is_the_truncated_svd_of_what_the_base_misses_with_the_scale_applied_once():
    base, lora = lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, _spec(3))
    q = np.asarray(base["dense"]["kernel"].dequantize(jnp.float32), np.float64)
    missed = np.asarray(W, np.float64) - q
    u, s, vt = np.linalg.svd(missed, full_matrices=False)
    want = (u[:, :8] * s[:8]) @ vt[:8]
    node = lora["dense"]["kernel"]
    got = np.asarray(node.a, np.float64) @ np.asarray(node.b, np.float64) * node.scale
    assert node.scale == 2.0
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())


def test_the_first_iterations_base_is_exactly_quantizes():
    base, _ = lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, _spec(1))
    ref = lora_jax.quantize(PARAMS)["dense"]["kernel"]
    got = base["dense"]["kernel"]
    assert repr(got) == repr(ref)
    for name in ("codes", "absmax", "absmax2", "offset"):
        np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(ref, name)), err_msg=name)


@pytest.mark.parametrize("fmt", ["int8", "fp4"])
def test_other_formats_and_a_multi_axis_kernel(fmt):
    w = _kernel((64, 4, 32))  # (d_model, heads, head_dim): PEFT's 2-D view is (128, 64)
    params = {"attn": {"query": {"kernel": w}}}
    spec = lora_jax.LoraSpec(rank=4, targets=["query"], axes={"query": "ioo"}, init="loftq_iter_2")
    base, lora = lora_jax.init_lora_and_base(jax.random.key(0), params, spec, format=fmt, block_size=32)
    q = base["attn"]["query"]["kernel"]
    assert (q.format, q.block_size, q.layout, q.shape) == (fmt, 32, "ioo", (64, 4, 32))
    plain = lora_jax.quantize(params, targets=["query"], axes={"query": "ioo"}, format=fmt, block_size=32)
    plain_error = float(
        np.linalg.norm(np.asarray(w) - np.asarray(lora_jax.dequantize(plain)["attn"]["query"]["kernel"]))
    )
    assert _error(params, base, lora, ("attn", "query", "kernel")) < plain_error


def test_a_loftq_adapter_trains_under_factored_on_its_quantized_base():
    x = jax.random.normal(jax.random.key(5), (32, 256))
    change = jax.random.normal(jax.random.key(6), (256, 4)) @ jax.random.normal(jax.random.key(7), (4, 128)) / 20
    y = x @ (W + change)  # a low-rank change the rank-8 adapter can learn
    base, lora = lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, _spec(2))

    def forward(p, x):
        return x @ p["dense"]["kernel"] + p["dense"]["bias"]

    def loss(lora):
        return jnp.mean((lora_jax.factored(forward)(base, lora, x) - y) ** 2)

    opt = optax.adam(3e-3)
    state = opt.init(lora)

    @jax.jit
    def step(lora, state):
        value, grads = jax.value_and_grad(loss)(lora)
        updates, state = opt.update(grads, state, lora)
        return optax.apply_updates(lora, updates), state, value

    losses = []
    for _ in range(30):
        lora, state, value = step(lora, state)
        losses.append(float(value))
    assert losses[-1] < 0.5 * losses[0], losses


def test_export_writes_a_plain_lora_for_the_loftq_base_and_refuses_the_rank_2r_conversion(tmp_path):
    spec = _spec(1)
    _, lora = lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, spec)
    out = lora_jax.export_peft(tmp_path / "peft", lora, spec)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True  # PEFT's "loftq" would need a loftq_config and redo LoftQ
    with pytest.raises(ValueError, match=r"init='loftq'.*quantization error"):
        lora_jax.export_peft(tmp_path / "peft2", lora, spec, initial=lora)


def test_bad_input_gives_clear_errors():
    with pytest.raises(TypeError, match=r"init_lora_and_base\(format=...\).*only with LoraSpec\(init='loftq'\)"):
        lora_jax.init_lora_and_base(
            jax.random.key(0), PARAMS, lora_jax.LoraSpec(rank=2, targets=["dense"], init="pissa"), format="nf4"
        )
    with pytest.raises(ValueError, match=r"init_lora_and_base\(format=...\)"):
        lora_jax.init_lora_and_base(jax.random.key(0), PARAMS, _spec(), format="nf3")
    with pytest.raises(TypeError, match=r"dense/kernel.*LoftQ quantizes the float kernel itself"):
        lora_jax.init_lora_and_base(jax.random.key(0), lora_jax.quantize(PARAMS), _spec())
    odd = {"dense": {"kernel": _kernel((30, 20))}}
    with pytest.raises(ValueError, match=r"dense/kernel: init_lora_and_base\(block_size=64\)"):
        lora_jax.init_lora_and_base(jax.random.key(0), odd, _spec(rank=2))
    with pytest.raises(ValueError, match=r"loftq_iter_N"):
        lora_jax.LoraSpec(rank=2, init="loftq_iter_0")
    assert lora_jax.LoraSpec(rank=2, init="loftq_iter_1").init == "loftq"
