"""DoRA vs LoRA on the benchmark GPT decoder: materialized and factored, paired in one run.

Rows (training steps, adam, the trained state donated, interleaved round-robin as in
``bench_factored.py``, whose ``Row``, timing and fill helpers this reuses): factored LoRA,
DoRA materialized (``apply_lora``: ``(m / n)·(W + s·A·B)`` formed per kernel), DoRA
factored (``lora_jax.factored``: ``n`` from ``‖W‖²``, ``Wᵀ·A`` and ``(Aᵀ·A, B)``, never
``W + s·A·B``; per use ``x·W`` kept for ``dm`` or recomputed, the default) and DoRA factored
with ``dora_recompute=True`` (the unscaled output recomputed at every use). Targets (issue #13): factored DoRA <= 1.15x factored LoRA step time
(median of the per-round ratio) and <= 1.05x its peak memory.

    python benchmarks/bench_dora.py                                   # 4 x d512, 1024 tokens
    python benchmarks/bench_dora.py --layers 2 --d-model 256 --seq 256 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_factored import TARGETS, Row, _fill, _paired_ratio, _train_step, measure

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, cross_entropy, lora_axes

LORA, DORA_MAT, DORA_FAC = "factored LoRA", "DoRA materialized (apply_lora)", "DoRA factored (lora_jax.factored)"
DORA_RECOMPUTE = "DoRA factored, dora_recompute=True (u recomputed at every use)"


def build_rows(cfg: GPTConfig, rank: int, batch: int, seed: int = 0) -> list[Row]:
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.max_len)), jnp.int32)
    params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], seed)
    spec = lora_jax.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS, axes=lora_axes(cfg))
    lora = _fill(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec)), seed + 1)
    dora = lora_jax.init_lora(jax.random.key(1), params, spec.replace(dora=True))
    # the same A and B as the LoRA rows (random, so that n differs from m and every term is live)
    dora = jax.tree.map(
        lambda d, lo: d if not isinstance(d, lora_jax.DoraWeights) else type(d)(lo.a, lo.b, d.m, d.scale, d.layout),
        dora,
        lora,
        is_leaf=lambda x: isinstance(x, (lora_jax.DoraWeights, lora_jax.LoraWeights)),
    )
    tx = optax.adam(1e-4)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    fac_apply = lora_jax.factored(apply, strategy="factored")  # the rows compare the fully factored strategy
    fac = _train_step(lambda lo, p, t: cross_entropy(fac_apply(p, lo, t), t), tx)
    re_apply = lora_jax.factored(apply, strategy="factored", dora_recompute=True)
    recompute = _train_step(lambda lo, p, t: cross_entropy(re_apply(p, lo, t), t), tx)
    mat = _train_step(lambda lo, p, t: cross_entropy(apply(lora_jax.apply_lora(p, lo), t), t), tx)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (each row owns its donated buffers)
    rows = [
        (LORA, fac, (copy(lora), tx.init(lora), params, tokens)),
        (DORA_MAT, mat, (copy(dora), tx.init(dora), params, tokens)),
        (DORA_FAC, fac, (copy(dora), tx.init(dora), params, tokens)),
        (DORA_RECOMPUTE, recompute, (copy(dora), tx.init(dora), params, tokens)),
    ]
    out = []
    for name, fn, args in rows:
        out.append(Row(name, fn, args, (0, 1), True))
        print(f"  compiled {name} in {out[-1].compile_s:.1f} s", file=sys.stderr)
    return out


def table(rows: list[Row]) -> tuple[str, dict[str, float]]:
    by = {r.name: r for r in rows}
    base = by[LORA]
    lines = [
        "| row | median step (s) | / factored LoRA | peak memory (MiB) | / factored LoRA | compile (s) "
        "| FLOPs / factored LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        med = statistics.median(r.times)
        lines.append(
            f"| {r.name} | {med:.4f} | {med / statistics.median(base.times):.3f} | {r.peak / 2**20:.1f} | "
            f"{r.peak / base.peak:.3f} | {r.compile_s:.1f} | {r.flops / base.flops:.3f} |"
        )
    median, lo, hi = _paired_ratio(by[DORA_FAC].times, base.times)
    checks = {
        "step time DoRA factored / LoRA factored": (median, f" [{lo:.3f}, {hi:.3f}]", 1.15),
        "peak memory DoRA factored / LoRA factored": (by[DORA_FAC].peak / base.peak, "", 1.05),
    }
    mat, mlo, mhi = _paired_ratio(by[DORA_MAT].times, base.times)
    re_t, rlo, rhi = _paired_ratio(by[DORA_RECOMPUTE].times, base.times)
    lines += [
        "",
        f"DoRA materialized / LoRA factored (paired) = {mat:.3f} [{mlo:.3f}, {mhi:.3f}]",
        f"DoRA factored with dora_recompute=True / LoRA factored (paired) = {re_t:.3f} [{rlo:.3f}, {rhi:.3f}], "
        f"peak {by[DORA_RECOMPUTE].peak / base.peak:.3f}",
    ]
    for name, (value, spread, limit) in checks.items():
        lines.append(f"- {name}: {value:.3f}{spread} (target <= {limit}) {'PASS' if value <= limit else 'MISS'}")
    return "\n".join(lines), {k: v[0] for k, v in checks.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)
    cfg = GPTConfig(vocab=a.vocab, d_model=a.d_model, heads=a.heads, layers=a.layers, d_ff=4 * a.d_model, max_len=a.seq)
    print(f"# {cfg}, batch={a.batch}, rank={a.rank}, backend={jax.default_backend()}")
    rows = build_rows(cfg, a.rank, a.batch)
    measure(rows, a.steps, a.warmup)
    text, checks = table(rows)
    print(text)
    return checks


if __name__ == "__main__":
    main()
