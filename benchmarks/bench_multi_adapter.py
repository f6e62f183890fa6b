"""Many adapters in one batch: ``mixed_batch`` vs one adapter, PEFT's loop and K merged models, paired in one run.

One batch of ``--batch`` sequences of ``--seq`` tokens on the benchmark GPT
decoder (LoRA of rank ``--rank`` on q, k, v, o and both MLP kernels), forward
only. For each K in ``--adapters`` (default 1, 4, 16, 64) the batch holds K
distinct adapters (``batch / K`` rows each, in shuffled order) and runs as:

* ``mixed_batch``: ``lora_jax.mixed_batch(forward)(params, bank, ids, tokens)``
  over ``lora_jax.stack`` of the K adapters (every row ``x·W + (x·A_i)·B_i``
  under ``vmap``; the base matmul stays one matmul over the whole batch);
* PEFT's loop: what PEFT's ``_mixed_batch_forward`` does in every LoRA layer,
  written in JAX: the base layer on the whole batch, then for each unique
  adapter its rows gathered, ``(x·A)·B·s`` computed and scatter-added back;
* sub-batches: one sub-batch per unique adapter (its rows gathered), the whole
  model run factored with that adapter, the outputs scattered back;
* K merged models: one merged param set per adapter (``lora_jax.merge``), each
  sub-batch run on its merged model.

References: the same batch on one adapter (``lora_jax.factored(forward,
strategy="factored")``, the form ``mixed_batch`` runs per row) and on the
base alone. Rows are interleaved round-robin (the order rotating every round,
``bench_factored.measure``); the ratios are medians over rounds of the
per-round ratio (quartiles in brackets), so drifts in machine speed cancel.
Target (issue #15): 16 distinct adapters with ``mixed_batch`` >= 0.7x the
one-adapter throughput. Every row's logits are compared with ``mixed_batch``'s
(column ``max |Δ|``). Memory: the bytes of base + K adapters (the bank) vs K
merged models, and each compiled program's peak from ``memory_analysis()``.

    python benchmarks/bench_multi_adapter.py                  # 4 x d256, batch 64 x 64 tokens, rank 8
    python benchmarks/bench_multi_adapter.py --layers 1 --d-model 32 --heads 2 --batch 4 --seq 8 --vocab 64 \\
        --adapters 1,2 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_factored import TARGETS, Row, _fill, _paired_ratio, measure
from gpt_variants import _EQ, _layernorm, lora_term

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, causal_attention, lora_axes

ONE, BASE = "one adapter, whole batch (factored)", "base alone"
KINDS = ("mixed", "peft", "subbatch", "merged")
LABELS = {
    "mixed": "mixed_batch",
    "peft": "PEFT's loop (per layer)",
    "subbatch": "sub-batch per adapter (factored)",
    "merged": "K merged models",
}
MIXED_TARGET = (16, 0.7)  # K distinct adapters, throughput / one adapter >= 0.7


def label(kind: str, k: int) -> str:
    return f"{LABELS[kind]}, K={k}"


def groups_of(ids: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """``(adapter, rows)`` for every unique id (PEFT's ``sub_batch_indices_list``), -1 left out."""
    return [(int(k), np.flatnonzero(ids == k)) for k in np.unique(ids) if k >= 0]


def _peft_dense(name: str, x: jax.Array, p: dict, nodes: Sequence[Any], rows: Sequence[jax.Array]) -> jax.Array:
    """PEFT's ``_mixed_batch_forward`` of one layer: the base on every row, each adapter on its own rows."""
    y = jnp.einsum(_EQ[name], x, p["kernel"]) + p["bias"]
    for node, r in zip(nodes, rows, strict=True):
        y = y.at[r].add(lora_term(_EQ[name], x[r], node))
    return y


def peft_loop_forward(params: dict, adapters: Sequence[dict], rows: Sequence[jax.Array], tokens: jax.Array, cfg):
    """Logits of the GPT with ``adapters[g]`` on the rows ``rows[g]`` of every adapted layer, PEFT's way.

    Rows in no group run on the base alone (PEFT's ``"__base__"``).
    """
    x = params["tok_embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][: tokens.shape[-1]]
    for i in range(cfg.layers):
        p = params[f"layers_{i}"]
        nodes = lambda n: [lo[f"layers_{i}"][n]["kernel"] for lo in adapters]  # noqa: E731, B023
        dense = lambda n, h: _peft_dense(n, h, p[n], nodes(n), rows)  # noqa: E731, B023
        h = _layernorm(p["ln_attn"], x)
        ctx = causal_attention(dense("query", h), dense("key", h), dense("value", h), chunk=cfg.attention_chunk)
        x = x + dense("out", ctx)
        x = x + dense("mlp_out", jax.nn.gelu(dense("mlp_in", _layernorm(p["ln_mlp"], x))))
    x = _layernorm(params["ln_final"], x)
    return (x @ params["lm_head"]["kernel"] + params["lm_head"]["bias"]).astype(jnp.float32)


def sub_batches(run: Callable, per_group: Sequence[Any], rows: Sequence[jax.Array], tokens: jax.Array) -> jax.Array:
    """``run(per_group[g], tokens[rows[g]])`` scattered back into the batch's rows (rows in no group: zeros)."""
    out = None
    for arg, r in zip(per_group, rows, strict=True):
        y = run(arg, tokens[r])
        out = jnp.zeros((tokens.shape[0], *y.shape[1:]), y.dtype) if out is None else out
        out = out.at[r].set(y)
    return out


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def build_rows(
    cfg: GPTConfig, rank: int, batch: int, ks: Sequence[int], kinds: Sequence[str] = KINDS, seed: int = 0
) -> tuple[list[Row], dict[str, Any]]:
    """The rows (compiled, arguments bound) and the facts the table needs (outputs' max |Δ|, memory)."""
    model = GPT(cfg)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.max_len)), jnp.int32)
    params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], seed)
    spec = lora_jax.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS, axes=lora_axes(cfg))
    shapes = jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec))
    adapters = [_fill(shapes, seed + 100 + k) for k in range(max(ks))]  # random A and B: every adapter differs
    factored = lora_jax.factored(apply, strategy="factored")
    mixed = lora_jax.mixed_batch(apply)
    peft = lambda p, los, rows, t: peft_loop_forward(p, los, rows, t, cfg)  # noqa: E731
    sub = lambda p, los, rows, t: sub_batches(lambda lo, x: factored(p, lo, x), los, rows, t)  # noqa: E731
    merged_fn = lambda ps, rows, t: sub_batches(apply, ps, rows, t)  # noqa: E731
    merge = jax.jit(lora_jax.merge)

    specs = [(ONE, factored, (params, adapters[0], tokens)), (BASE, apply, (params, tokens))]
    memory = {}
    for k in ks:
        if batch % k:
            raise SystemExit(f"--adapters: K={k} does not divide --batch {batch} (each adapter gets batch / K rows)")
        ids = np.random.default_rng(seed + k).permutation(np.arange(batch) % k).astype(np.int32)
        groups = groups_of(ids)
        rows = [jnp.asarray(r) for _, r in groups]
        los = [adapters[g] for g, _ in groups]
        bank = lora_jax.stack(adapters[:k])
        memory[k] = (_nbytes(params) + _nbytes(bank), k * _nbytes(params))
        if "mixed" in kinds:
            specs.append((label("mixed", k), mixed, (params, bank, jnp.asarray(ids), tokens)))
        if "peft" in kinds:
            specs.append((label("peft", k), peft, (params, los, rows, tokens)))
        if "subbatch" in kinds:
            specs.append((label("subbatch", k), sub, (params, los, rows, tokens)))
        if "merged" in kinds:
            specs.append((label("merged", k), merged_fn, ([merge(params, lo) for lo in los], rows, tokens)))
    out, results = [], {}
    for name, fn, args in specs:
        out.append(Row(name, fn, args, (), False))
        results[name] = np.asarray(out[-1].compiled(*args))
        print(f"  compiled {name} in {out[-1].compile_s:.1f} s", file=sys.stderr)
    diffs = {}
    for k in ks:  # every way of running the K-adapter batch gives mixed_batch's logits (or PEFT's, without it)
        ref = results.get(label("mixed", k), results.get(label(kinds[0], k)))
        for kind in kinds:
            diffs[label(kind, k)] = float(np.max(np.abs(results[label(kind, k)] - ref)))
    return out, {"memory": memory, "diffs": diffs, "tokens": batch * cfg.max_len, "kinds": tuple(kinds)}


def table(rows: list[Row], facts: dict[str, Any], ks: Sequence[int]) -> tuple[str, dict[str, float]]:
    by = {r.name: r for r in rows}
    one = by[ONE]
    tokens = facts["tokens"]
    lines = [
        "| row | median (s) | tokens/s | throughput / one adapter (paired) | peak memory (MiB) | compile (s) "
        "| max abs diff vs mixed_batch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    checks = {}
    for r in rows:
        med = statistics.median(r.times)
        ratio, lo, hi = _paired_ratio(one.times, r.times)  # t_one / t_row per round = throughput ratio
        diff = facts["diffs"].get(r.name)
        lines.append(
            f"| {r.name} | {med:.4f} | {tokens / med:,.0f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] | "
            f"{r.peak / 2**20:.1f} | {r.compile_s:.1f} | {'' if diff is None else f'{diff:.1e}'} |"
        )
        checks[r.name] = ratio
    lines += ["", "| K | base + K adapters (MiB) | K merged models (MiB) | ratio |", "|---:|---:|---:|---:|"]
    for k in ks:
        bank, merged = facts["memory"][k]
        lines.append(f"| {k} | {bank / 2**20:.1f} | {merged / 2**20:.1f} | {bank / merged:.3f} |")
    lines.append("")
    lines.append("throughput ratios: median over rounds of the per-round ratio t(one adapter) / t(row), 25-75%")
    k, limit = MIXED_TARGET
    if label("mixed", k) in by:
        value = checks[label("mixed", k)]
        verdict = "PASS" if value >= limit else "MISS"
        lines.append(f"- {k} distinct adapters, mixed_batch / one adapter: {value:.3f} (target >= {limit}) {verdict}")
    return "\n".join(lines), checks


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=64, help="sequences per batch")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapters", default="1,4,16,64", help="comma-separated K: distinct adapters in the batch")
    ap.add_argument("--rows", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    ap.add_argument("--steps", type=int, default=7, help="timed rounds")
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.adapters.split(",")]
    kinds = tuple(a.rows.split(","))
    if set(kinds) - set(KINDS):
        ap.error(f"--rows: unknown {sorted(set(kinds) - set(KINDS))}; expected a subset of {','.join(KINDS)}")
    cfg = GPTConfig(vocab=a.vocab, d_model=a.d_model, heads=a.heads, layers=a.layers, d_ff=4 * a.d_model, max_len=a.seq)
    print(f"# {cfg}, batch={a.batch}, rank={a.rank}, K={ks}, backend={jax.default_backend()}")
    rows, facts = build_rows(cfg, a.rank, a.batch, ks, kinds)
    measure(rows, a.steps, a.warmup)
    text, checks = table(rows, facts, ks)
    print(text)
    return checks


if __name__ == "__main__":
    main()
