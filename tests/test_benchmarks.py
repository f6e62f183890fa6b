"""The benchmark's reference models compute what lora_jax's GPT computes, and the script runs end to end.

``benchmarks/gpt_variants.py`` claims the hand-written factored model and the
nnx.LoRALinear peer are the same decoder as ``lora_jax.models.gpt.GPT``; the
benchmark's ratios mean something only if that holds.
"""

from __future__ import annotations

import os
import re
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

from tests._small_models import random_like  # noqa: E402

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


def test_peft_loop_and_merged_sub_batches_equal_each_rows_own_adapter():
    """bench_multi_adapter's PEFT-style loop and K-merged-models rows compute every row with its own adapter."""
    from bench_multi_adapter import groups_of, peft_loop_forward, sub_batches

    cfg = GPTConfig(vocab=40, d_model=16, heads=2, layers=2, d_ff=32, max_len=8)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab, (5, cfg.max_len)), jnp.int32)
    model = GPT(cfg)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    params = random_like(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], seed=0)
    specs = [
        lora_jax.LoraSpec(rank=2, alpha=4.0, targets=TARGETS, axes=lora_axes(cfg)),
        lora_jax.LoraSpec(rank=3, alpha=1.0, targets=TARGETS, axes=lora_axes(cfg)),
    ]
    # every factor random (B != 0: the adapters matter), filled with NumPy (no compile of a random init)
    adapters = [
        random_like(jax.eval_shape(lambda s=s: lora_jax.init_lora(jax.random.key(0), params, s)), k + 1)
        for k, s in enumerate(specs)
    ]
    ids = np.array([1, -1, 0, 1, 0])
    groups = groups_of(ids)
    assert [(g, r.tolist()) for g, r in groups] == [(0, [2, 4]), (1, [0, 3])]
    rows = [jnp.asarray(r) for _, r in groups]
    los = [adapters[g] for g, _ in groups]
    peft = jax.jit(peft_loop_forward, static_argnums=4)(params, los, rows, tokens, cfg)
    merged_params = [lora_jax.apply_lora(params, lo) for lo in los]
    merged = jax.jit(lambda ps, r, t: sub_batches(apply, ps, r, t))(merged_params, rows, tokens)
    for j, i in enumerate(ids):
        want = apply(params if i < 0 else lora_jax.apply_lora(params, adapters[i]), tokens[j : j + 1])[0]
        np.testing.assert_allclose(peft[j], want, rtol=1e-5, atol=1e-5)
        if i >= 0:  # sub_batches leaves rows of no group at zero
            np.testing.assert_allclose(merged[j], want, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(peft[0] - peft[2]))) > 1e-2  # the two adapters give visibly different logits


def test_multi_adapter_benchmark_prints_every_row_and_the_target():
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_multi_adapter.py")]
    cmd += ["--layers", "1", "--d-model", "16", "--heads", "2", "--seq", "8", "--vocab", "32", "--batch", "16"]
    cmd += ["--adapters", "16", "--steps", "1", "--warmup", "0"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    for row in ("one adapter, whole batch", "base alone"):
        assert f"| {row}" in out, out
    for k in (16,):
        for kind in ("mixed_batch", "PEFT's loop (per layer)", "sub-batch per adapter (factored)", "K merged models"):
            assert f"| {kind}, K={k} |" in out, out
        assert re.search(rf"^\| {k} \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M), out
    diffs = [float(m) for m in re.findall(r"\| ([\d.]+e[-+]\d+) \|$", out, re.M)]
    assert len(diffs) == 4 and max(diffs) < 1e-4, out  # every way of running the batch gives the same logits
    assert re.search(
        r"^- 16 distinct adapters, mixed_batch / one adapter: [\d.]+ \(target >= 0.7\) (PASS|MISS)$", out, re.M
    )
