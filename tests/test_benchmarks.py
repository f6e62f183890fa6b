"""The benchmark's reference models compute what lora_jax's GPT computes, and the script runs end to end.

``benchmarks/gpt_variants.py`` claims the hand-written factored model and the
nnx.LoRALinear peer are the same decoder as ``lora_jax.models.gpt.GPT``; the
benchmark's ratios mean something only if that holds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, lora_axes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from gpt_variants import NnxGPT, PlainNnxGPT, handwritten_forward  # noqa: E402

TARGETS = ["query", "key", "value", "out", "mlp_in", "mlp_out"]
SWITCHES = [{}, {"remat": True, "attention_chunk": 4}]


def _tokens(cfg: GPTConfig) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (2, cfg.max_len)), jnp.int32)


@pytest.mark.parametrize("switches", SWITCHES, ids=["plain", "remat+chunked"])
def test_handwritten_model_matches_apply_lora_values_and_gradients(switches):
    cfg = GPTConfig(vocab=40, d_model=16, heads=2, layers=2, d_ff=32, max_len=8, **switches)
    tokens, model = _tokens(cfg), GPT(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]
    spec = lora_jax.LoraSpec(rank=2, targets=TARGETS, axes=lora_axes(cfg), init="random")
    lora = lora_jax.init_lora(jax.random.key(1), params, spec)
    ref = lambda lo: jnp.sum(jnp.sin(model.apply({"params": lora_jax.apply_lora(params, lo)}, tokens)))  # noqa: E731
    hand = lambda lo: jnp.sum(jnp.sin(handwritten_forward(params, lo, tokens, cfg)))  # noqa: E731
    (v_ref, g_ref), (v_hand, g_hand) = jax.jit(lambda lo: (jax.value_and_grad(ref)(lo), jax.value_and_grad(hand)(lo)))(
        lora
    )
    np.testing.assert_allclose(v_hand, v_ref, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(g_hand), jax.tree.leaves(g_ref), strict=True):  # float32 rounding
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def _peer_weights_as_plain(peer: NnxGPT, plain: PlainNnxGPT) -> tuple[nnx.State, dict]:
    """The plain model's state with the peer's kernels, and the peer's adapters as a lora_jax tree."""
    _, peer_state = nnx.split(peer)
    graphdef, plain_state = nnx.split(plain)
    peer_flat = dict(nnx.to_flat_state(peer_state))
    for path, var in nnx.to_flat_state(plain_state):
        var.set_value(peer_flat[path].get_value())
    lora = {}
    for i, layer in enumerate(peer.layers):
        for name in TARGETS:
            lin = getattr(layer, name)
            node = lora_jax.LoraWeights(lin.lora.lora_a[...], lin.lora.lora_b[...], scale=1.0, layout="io")
            lora.setdefault("layers", {}).setdefault(i, {}).setdefault(name, {})["kernel"] = node
    return graphdef, plain_state, lora


@pytest.mark.parametrize("switches", SWITCHES, ids=["plain", "remat+chunked"])
def test_peer_model_equals_factored_lora_on_the_plain_model(switches):
    cfg = GPTConfig(vocab=40, d_model=16, heads=2, layers=2, d_ff=32, max_len=8, **switches)
    tokens = _tokens(cfg)
    peer = NnxGPT(cfg, 2, nnx.Rngs(0))
    for layer in peer.layers:  # nonzero B, so the adapters matter
        for name in TARGETS:
            lin = getattr(layer, name)
            lin.lora.lora_b.set_value(0.3 * jax.random.normal(jax.random.key(len(name)), lin.lora.lora_b.shape))
    graphdef, plain_state, lora = _peer_weights_as_plain(peer, PlainNnxGPT(cfg, nnx.Rngs(1)))
    got = lora_jax.factored(lambda s, t: nnx.merge(graphdef, s)(t))(plain_state, lora, tokens)
    np.testing.assert_allclose(got, peer(tokens), rtol=1e-5, atol=1e-5)


def test_benchmark_script_prints_the_table_and_the_four_targets():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_factored.py")]
    cmd += [
        "--layers",
        "1",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--seq",
        "16",
        "--vocab",
        "64",
        "--steps",
        "1",
        "--warmup",
        "0",
    ]
    cmd += ["--remat", "--attention-chunk", "8", "--xla-cpu-scheduler", "memory"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    assert "--xla_cpu_enable_concurrency_optimized_scheduler=false" in out
    for row in (
        "full fine-tuning",
        "factored LoRA (lora_jax.factored)",
        "hand-written factored",
        "flax nnx.LoRALinear (peer)",
    ):
        assert f"| {row}" in out
    targets = [line for line in out.splitlines() if line.startswith("- ") and "(target <=" in line]
    assert len(targets) == 4, out


def test_qlora_benchmark_prints_the_three_rows_and_the_two_targets():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_qlora.py")]
    cmd += ["--layers", "2", "--d-model", "64", "--d-ff", "256", "--tokens", "8", "--steps", "1", "--warmup", "0"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # XLA:CPU's default scheduler
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    for row in ("bf16 LoRA", "NF4 QLoRA (double quant)", "int8 (absmax per 64)"):
        assert f"| {row} |" in out, out
    assert "| NF4 QLoRA (double quant) | 0.516 |" in out  # bitsandbytes' own figure for NF4 + double quant
    targets = [line for line in out.splitlines() if line.startswith("- ") and "(target <=" in line]
    assert len(targets) == 2, out
    assert "qwix" in out
