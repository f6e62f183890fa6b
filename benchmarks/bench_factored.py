"""Factored vs materialized LoRA on a GPT-style decoder: one table, measured side by side.

Rows: full fine-tuning, materialized LoRA (``apply_lora``), factored LoRA
(``lora_jax.factored``), a hand-written factored model (the reachable limit),
the same model from flax ``nnx.LoRALinear`` (the peer), factored LoRA on the
peer's own model (2-D kernels reshaped into heads: the like-for-like comparison
with the peer), inference with merged weights and inference of the base. LoRA on q, k, v, o and the MLP kernels; adam
on the trained tree; the trained state is donated.

Columns: median step time over ``--steps`` repetitions after warm-up (rows are
interleaved round-robin so machine noise hits all of them alike; training and
inference rows in separate round-robins, the order rotating every round), its ratio to
full fine-tuning, peak memory from ``compiled.memory_analysis()`` (arguments +
outputs - aliased + temporaries), compile time and the FLOP count ratio from
``compiled.cost_analysis()``. The time targets compare rows of one round-robin
by the median over rounds of their per-round ratio (with quartiles), so a
drift in machine speed between rounds cancels.

    python benchmarks/bench_factored.py                       # issue config: 4 x d512, 1024 tokens, vocab 2048
    python benchmarks/bench_factored.py --remat --attention-chunk 128 --xla-cpu-scheduler memory
    python benchmarks/bench_factored.py --layers 1 --d-model 32 --seq 16 --vocab 64 --steps 1

Memory switches (they apply to every row alike, and change no result):
``--remat`` recomputes each block in the backward pass (gradient checkpointing),
``--attention-chunk`` computes causal attention that many queries at a time
(``lora_jax.models.gpt.causal_attention``), and ``--xla-cpu-scheduler memory``
turns off XLA:CPU's concurrency-optimized scheduler, which otherwise orders
the recomputation so early that checkpointing saves little on CPU. At 1024
tokens saved activations (the ``(heads, T, T)`` attention matrices) outweigh
parameters and optimizer state; these switches are how long-sequence
fine-tuning is run, and they expose what LoRA itself saves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax._src import xla_bridge

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpt_variants import NnxGPT, PlainNnxGPT, handwritten_forward

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, cross_entropy, lora_axes

TARGETS = ["query", "key", "value", "out", "mlp_in", "mlp_out"]


def _fill(tree: Any, seed: int, scale: float = 0.02) -> Any:
    """Random values for an abstract tree (NumPy: no per-shape init compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


def _train_step(loss: Callable, tx: optax.GradientTransformation) -> Callable:
    def step(trained, opt_state, *rest):
        value, grads = jax.value_and_grad(loss)(trained, *rest)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, value

    return step


class Row:
    """One benchmark row: a compiled function and the arguments it cycles through."""

    def __init__(self, name: str, fn: Callable, args: tuple, donate: tuple[int, ...], train: bool):
        self.name, self.train = name, train
        t0 = time.perf_counter()
        self.compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
        self.compile_s = time.perf_counter() - t0
        mem = self.compiled.memory_analysis()
        self.peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
        self.peak += mem.temp_size_in_bytes
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        self.args, self.times = args, []

    def run(self) -> float:
        t0 = time.perf_counter()
        out = self.compiled(*self.args)
        jax.block_until_ready(out)
        if self.train:  # feed the donated state back in
            self.args = (out[0], out[1], *self.args[2:])
        return time.perf_counter() - t0


ROW_KEYS = ("full", "materialized", "factored", "hand", "peer", "factored_peer_model", "merged", "base")


def build_rows(cfg: GPTConfig, rank: int, batch: int, keys: tuple[str, ...] = ROW_KEYS, seed: int = 0) -> list[Row]:
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.max_len)), jnp.int32)
    params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], seed)
    spec = lora_jax.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS, axes=lora_axes(cfg))
    lora = _fill(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec)), seed + 1)
    tx = optax.adam(1e-4)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    full = _train_step(lambda p, t: cross_entropy(apply(p, t), t), tx)
    mat = _train_step(lambda lo, p, t: cross_entropy(apply(lora_jax.apply_lora(p, lo), t), t), tx)
    fac_apply = lora_jax.factored(apply)
    fac = _train_step(lambda lo, p, t: cross_entropy(fac_apply(p, lo, t), t), tx)
    hand = _train_step(lambda lo, p, t: cross_entropy(handwritten_forward(p, lo, t, cfg), t), tx)

    graphdef, nnx_lora, nnx_rest = nnx.split(nnx.eval_shape(lambda: NnxGPT(cfg, rank, nnx.Rngs(0))), nnx.LoRAParam, ...)
    nnx_lora, nnx_rest = _fill(nnx_lora, seed + 2), _fill(nnx_rest, seed + 3)
    peer = _train_step(lambda lo, rest, t: cross_entropy(nnx.merge(graphdef, lo, rest)(t), t), tx)
    # lora_jax.factored on the peer's own model (2-D kernels reshaped into heads), for a like-for-like comparison
    plain_def, plain = nnx.split(nnx.eval_shape(lambda: PlainNnxGPT(cfg, nnx.Rngs(0))))
    plain = _fill(plain, seed + 4)
    plain_spec = spec.replace(axes=())  # 2-D kernels: the default "io" layout
    plain_lora = _fill(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(2), plain, plain_spec)), seed + 5)
    fac_plain_apply = lora_jax.factored(lambda p, t: nnx.merge(plain_def, p)(t))
    fac_plain = _train_step(lambda lo, p, t: cross_entropy(fac_plain_apply(p, lo, t), t), tx)

    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (each row owns its donated buffers)
    merged = lora_jax.merge(params, lora)
    rows = [
        ("full fine-tuning", full, (copy(params), tx.init(params), tokens), True),
        ("materialized LoRA (apply_lora)", mat, (copy(lora), tx.init(lora), params, tokens), True),
        ("factored LoRA (lora_jax.factored)", fac, (copy(lora), tx.init(lora), params, tokens), True),
        ("hand-written factored", hand, (copy(lora), tx.init(lora), params, tokens), True),
        ("flax nnx.LoRALinear (peer)", peer, (copy(nnx_lora), tx.init(nnx_lora), nnx_rest, tokens), True),
        ("factored LoRA on the peer's model", fac_plain, (copy(plain_lora), tx.init(plain_lora), plain, tokens), True),
        ("inference, merged weights", lambda p, t: apply(p, t), (merged, tokens), False),
        ("inference, base weights", lambda p, t: apply(p, t), (params, tokens), False),
    ]
    out = []
    for key, (name, fn, args, train) in zip(ROW_KEYS, rows, strict=True):
        if key not in keys and key != "full":  # full fine-tuning is the reference of every ratio
            continue
        out.append(Row(name, fn, args, (0, 1) if train else (), train))
        print(f"  compiled {name} in {out[-1].compile_s:.1f} s", file=sys.stderr)
    return out


def measure(rows: list[Row], steps: int, warmup: int) -> None:
    for _ in range(warmup):
        for row in rows:
            row.run()
    # Training rows and inference rows are timed in separate round-robins (an inference step right after a
    # training step runs slower: the training step's memory traffic evicts its caches). Within a group the
    # order rotates every round, so noise from other processes and position effects hit every row alike.
    for group in ([r for r in rows if r.train], [r for r in rows if not r.train]):
        for i in range(steps):
            k = i % max(len(group), 1)
            for row in group[k:] + group[:k]:
                row.times.append(row.run())


def _paired_ratio(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Median and quartiles of ``a[i] / b[i]`` over the rounds: drifts in machine speed cancel within a round."""
    r = np.asarray(a) / np.asarray(b)
    return float(np.median(r)), float(np.percentile(r, 25)), float(np.percentile(r, 75))


def table(rows: list[Row]) -> tuple[str, dict[str, float]]:
    by = {r.name: r for r in rows}
    full = by["full fine-tuning"]
    med = {r.name: statistics.median(r.times) for r in rows}
    lines = [
        "| row | median step (s) | / full FT | min step (s) | / full FT | peak memory (MiB) | / full FT "
        "| compile (s) | FLOPs / full FT |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    best = {r.name: min(r.times) for r in rows}
    for r in rows:
        lines.append(
            f"| {r.name} | {med[r.name]:.4f} | {med[r.name] / med[full.name]:.3f} | {best[r.name]:.4f} | "
            f"{best[r.name] / best[full.name]:.3f} | {r.peak / 2**20:.1f} | "
            f"{r.peak / full.peak:.3f} | {r.compile_s:.1f} | {r.flops / full.flops:.3f} |"
        )
    ratio = lambda a, b: med[a] / med[b] if a in med and b in med else float("nan")  # noqa: E731
    fac, hand = ratio("factored LoRA (lora_jax.factored)", full.name), ratio("hand-written factored", full.name)
    paired = {
        "factored/full within 5% of hand-written/full": (
            "factored LoRA (lora_jax.factored)",
            "hand-written factored",
            1.05,
        ),
        "factored / nnx.LoRALinear peer, same model": (
            "factored LoRA on the peer's model",
            "flax nnx.LoRALinear (peer)",
            1.0,
        ),
        "merged inference / base inference": ("inference, merged weights", "inference, base weights", 1.02),
    }
    checks = {}
    for label, (a, b, limit) in paired.items():
        if a in by and b in by:  # rows of one group ran back to back in every round: per-round ratios
            median, lo, hi = _paired_ratio(by[a].times, by[b].times)
            checks[label] = (median, f" [{lo:.3f}, {hi:.3f}]", limit)
    if "factored LoRA (lora_jax.factored)" in by:
        checks["peak memory factored / full FT"] = (by["factored LoRA (lora_jax.factored)"].peak / full.peak, "", 0.5)
    lines.append("")
    lines.append(f"factored/full = {fac:.3f}, hand-written/full = {hand:.3f} (ratios of median step times)")
    cross = ratio("factored LoRA (lora_jax.factored)", "flax nnx.LoRALinear (peer)")
    if not np.isnan(cross):  # the GPT uses multi-axis DenseGeneral kernels, the peer 2-D kernels + reshapes
        lines.append(f"factored on our GPT / peer on its model = {cross:.3f} (two model codes: information only)")
    lines.append("time targets: median over rounds of the per-round ratio (rows of a round run back to back), 25-75%")
    for name, (value, spread, limit) in checks.items():
        lines.append(f"- {name}: {value:.3f}{spread} (target <= {limit}) {'PASS' if value <= limit else 'MISS'}")
    return "\n".join(lines), {k: v[0] for k, v in checks.items()}


MEMORY_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def _use_memory_scheduler() -> None:
    """Add the XLA:CPU memory-scheduler flag to XLA_FLAGS; XLA reads it when the backend starts."""
    if MEMORY_SCHEDULER_FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            "--xla-cpu-scheduler memory: JAX's backend is already initialized in this process, so XLA_FLAGS can no "
            f"longer change. Hint: run the script in a fresh process, or set XLA_FLAGS={MEMORY_SCHEDULER_FLAG} first."
        )
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {MEMORY_SCHEDULER_FLAG}".strip()


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=None, help="default 4 * d_model")
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=7, help="timed repetitions per row")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROW_KEYS), help=f"comma-separated subset of {','.join(ROW_KEYS)}")
    ap.add_argument("--remat", action="store_true", help="recompute each block in the backward pass (all rows)")
    ap.add_argument("--attention-chunk", type=int, default=None, help="queries per causal-attention block")
    ap.add_argument(
        "--xla-cpu-scheduler",
        choices=("concurrency", "memory"),
        default="concurrency",
        help="XLA:CPU's default concurrency-optimized scheduler, or the memory-minimizing one",
    )
    a = ap.parse_args(argv)
    if a.xla_cpu_scheduler == "memory":
        _use_memory_scheduler()
    cfg = GPTConfig(
        vocab=a.vocab,
        d_model=a.d_model,
        heads=a.heads,
        layers=a.layers,
        d_ff=a.d_ff or 4 * a.d_model,
        max_len=a.seq,
        dtype=a.dtype,
        remat=a.remat,
        attention_chunk=a.attention_chunk,
    )
    print(f"# {cfg}, batch={a.batch}, rank={a.rank}, backend={jax.default_backend()}, devices={jax.devices()}")
    print(f"# XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    keys = tuple(a.rows.split(","))
    unknown = set(keys) - set(ROW_KEYS)
    if unknown:
        ap.error(f"--rows: unknown {sorted(unknown)}; expected a subset of {','.join(ROW_KEYS)}")
    rows = build_rows(cfg, a.rank, a.batch, keys)
    measure(rows, a.steps, a.warmup)
    text, checks = table(rows)
    print(text)
    return checks


if __name__ == "__main__":
    main()
