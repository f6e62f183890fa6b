"""lora_jax.models.gpt: causal attention (whole and chunked) and the memory switches (remat, attention_chunk)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_jax.models.gpt import GPT, GPTConfig, causal_attention, cross_entropy


def _attention_np(q, k, v):
    """Causal softmax attention in float64 with explicit loops over heads."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    *lead, t, heads, d = q.shape
    out = np.zeros(q.shape)
    for idx in np.ndindex(*lead, heads):
        *b, h = idx
        qs, ks, vs = q[(*b, slice(None), h)], k[(*b, slice(None), h)], v[(*b, slice(None), h)]
        scores = qs @ ks.T / np.sqrt(d)
        scores[np.triu_indices(t, 1)] = -np.inf
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[(*b, slice(None), h)] = (w / w.sum(-1, keepdims=True)) @ vs
    return out


@pytest.mark.parametrize("chunk", [None, 2, 3, 12], ids=lambda c: f"chunk={c}")
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_causal_attention_matches_float64_reference(chunk, jit):
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 12, 3, 4))
    fn = jax.jit(causal_attention, static_argnames="chunk") if jit else causal_attention
    np.testing.assert_allclose(fn(q, k, v, chunk=chunk), _attention_np(q, k, v), rtol=2e-5, atol=2e-6)


def test_causal_attention_bfloat16_matches_float64_reference():
    q, k, v = jax.random.normal(jax.random.key(1), (3, 1, 8, 2, 4)).astype(jnp.bfloat16)
    got = causal_attention(q, k, v, chunk=4)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), _attention_np(q, k, v), atol=4e-2)


def test_chunked_attention_gradients_equal_whole():
    q, k, v = jax.random.normal(jax.random.key(2), (3, 2, 8, 2, 4))
    loss = lambda chunk: lambda *qkv: jnp.sum(jnp.sin(causal_attention(*qkv, chunk=chunk)))  # noqa: E731
    whole = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
    chunked = jax.grad(loss(4), argnums=(0, 1, 2))(q, k, v)
    for g_c, g_w in zip(chunked, whole, strict=True):
        np.testing.assert_allclose(g_c, g_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk", [4, 0, -2])
def test_chunk_that_does_not_divide_the_sequence_raises(chunk):
    q = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(
        ValueError, match=rf"chunk={chunk} must be a positive integer that divides the sequence length 10.*Hint"
    ):
        causal_attention(q, q, q, chunk=chunk)


BASE = GPTConfig(vocab=40, d_model=16, heads=2, layers=2, d_ff=32, max_len=8)
TOKENS = np.random.default_rng(0).integers(0, 40, (2, 8)).astype(np.int32)


def _value_and_grad(cfg: GPTConfig, params):
    model = GPT(cfg)
    loss = lambda p: cross_entropy(model.apply({"params": p}, TOKENS), TOKENS)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(params)


@functools.cache
def _plain(scan: bool):
    """Parameters, loss and gradients of the GPT without the memory switches."""
    cfg = dataclasses.replace(BASE, scan=scan)
    params = GPT(cfg).init(jax.random.key(0), TOKENS)["params"]
    return params, *_value_and_grad(cfg, params)


@pytest.mark.parametrize("scan", [False, True], ids=["looped", "nn.scan"])
@pytest.mark.parametrize("switches", [{"remat": True}, {"attention_chunk": 4}, {"remat": True, "attention_chunk": 2}])
def test_memory_switches_keep_parameters_logits_and_gradients(scan, switches):
    params, v_plain, g_plain = _plain(scan)
    cfg = dataclasses.replace(BASE, scan=scan, **switches)
    abstract = jax.eval_shape(GPT(cfg).init, jax.random.key(0), TOKENS)["params"]
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    v, g = _value_and_grad(cfg, params)
    np.testing.assert_allclose(v, v_plain, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(g), jax.tree.leaves(g_plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
