"""QLoRA under ``lora_jax.factored``: a bf16 base against NF4 and int8 bases, one training step, in one run.

The model is weights-dominated (issue #14): a stack of ``--layers`` residual MLP
blocks ``x + gelu(x·W_up)·W_down`` (``--d-model`` -> ``--d-ff`` -> ``--d-model``,
no biases) in bfloat16 on ``--tokens`` tokens, LoRA rank ``--rank`` on every
kernel. Each row is the same jitted training step (``value_and_grad`` of the
factored loss, optax adam on the adapters only, the trained state donated);
only the base differs:

* bf16 LoRA: the kernels as bfloat16 arrays;
* NF4 QLoRA: ``lora_jax.quantize(format="nf4", double_quant=True)`` (bitsandbytes'
  format, blocks of 64, the absmax statistics in 8 bits);
* int8: ``lora_jax.quantize(format="int8", double_quant=False)`` (absmax per block
  of 64 in float32).

Under ``factored`` a quantized kernel is dequantized at its use inside the
product's ``custom_vjp`` (``lora_jax/factored/_quantized.py``): the backward pass
keeps the codes, not the dequantized kernel.

Columns: the base's stored bytes per parameter, peak memory from
``compiled.memory_analysis()`` (arguments + outputs + temporaries - aliased, the
XLA:CPU scheduler as configured, by default its default one), median step time
over ``--steps`` round-robin rounds after warm-up (the row order rotates every
round), and the ratios to bf16 LoRA; the time ratio is the median over rounds
of the per-round ratio, with quartiles. Targets: NF4 peak <= 0.45x the bf16
row's, NF4 step time <= 1.5x.

    python benchmarks/bench_qlora.py                           # 8 x (1024 -> 4096 -> 1024), 64 tokens, rank 8
    python benchmarks/bench_qlora.py --layers 2 --d-model 64 --d-ff 256 --tokens 8 --steps 1 --warmup 0
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

from bench_factored import Row, _paired_ratio, _train_step, measure

import lora_jax

BF16, NF4, INT8 = "bf16 LoRA", "NF4 QLoRA (double quant)", "int8 (absmax per 64)"
BASES = {BF16: None, NF4: {"format": "nf4", "double_quant": True}, INT8: {"format": "int8", "double_quant": False}}
QWIX_NOTE = (
    "Format note: qwix (JAX) quantizes weights per channel or per sub-channel tile (native int8/int4/fp8, nf4 "
    "emulated), absmax/minmax/rms calibration, float scales and no double quantization; int8 per channel stores "
    "~1.0 bytes/param plus a scale per output channel. NF4 with double quantization (bitsandbytes' QLoRA format, "
    "the row above) stores 0.516."
)


def mlp_stack(params: dict, x: jax.Array) -> jax.Array:
    """``x + gelu(x·W_up)·W_down`` for every block, in the activations' dtype."""
    for i in range(len(params)):
        block = params[f"block_{i}"]
        x = x + jax.nn.gelu(x @ block["up"]["kernel"]) @ block["down"]["kernel"]
    return x


def loss_fn(params: dict, x: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(mlp_stack(params, x).astype(jnp.float32)))


def base_params(layers: int, d_model: int, d_ff: int, seed: int = 0) -> dict:
    """bf16 kernels with random values (NumPy: no per-shape init compiles)."""
    rng = np.random.default_rng(seed)

    def kernel(shape: tuple[int, int]) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape, np.float32) / np.sqrt(shape[0]), jnp.bfloat16)

    return {
        f"block_{i}": {"up": {"kernel": kernel((d_model, d_ff))}, "down": {"kernel": kernel((d_ff, d_model))}}
        for i in range(layers)
    }


def stored_bytes(params: dict) -> int:
    leaves = jax.tree.leaves(params)
    return sum(x.size * x.dtype.itemsize for x in leaves)


def build_rows(layers: int, d_model: int, d_ff: int, tokens: int, rank: int) -> tuple[list[Row], dict[str, float]]:
    base = base_params(layers, d_model, d_ff)
    n_params = sum(x.size for x in jax.tree.leaves(base))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((tokens, d_model), np.float32), jnp.bfloat16)
    spec = lora_jax.LoraSpec(rank=rank, alpha=2.0 * rank, init="random")
    lora = lora_jax.init_lora(jax.random.key(1), base, spec)  # the same adapters on every base
    tx = optax.adam(1e-4)
    fac_loss = lora_jax.factored(loss_fn)
    step = _train_step(lambda lo, p, t: fac_loss(p, lo, t), tx)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (each row owns its donated buffers)
    rows, per_param = [], {}
    for name, options in BASES.items():
        params = base if options is None else lora_jax.quantize(base, **options)
        per_param[name] = stored_bytes(params) / n_params
        rows.append(Row(name, step, (copy(lora), tx.init(lora), params, x), (0, 1), True))
        print(f"  compiled {name} in {rows[-1].compile_s:.1f} s", file=sys.stderr)
    return rows, per_param


def table(rows: list[Row], per_param: dict[str, float]) -> tuple[str, dict[str, float]]:
    by = {r.name: r for r in rows}
    base = by[BF16]
    med = {r.name: statistics.median(r.times) for r in rows}
    lines = [
        "| row | base bytes / param | peak memory (MiB) | / bf16 LoRA | arguments (MiB) | temporaries (MiB) "
        "| median step (s) | / bf16 LoRA (paired) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio, lo, hi = _paired_ratio(r.times, base.times)
        mem = r.compiled.memory_analysis()
        lines.append(
            f"| {r.name} | {per_param[r.name]:.3f} | {r.peak / 2**20:.1f} | {r.peak / base.peak:.3f} | "
            f"{mem.argument_size_in_bytes / 2**20:.1f} | {mem.temp_size_in_bytes / 2**20:.1f} | "
            f"{med[r.name]:.4f} | {ratio:.3f} [{lo:.3f}, {hi:.3f}] |"
        )
    time_ratio, tlo, thi = _paired_ratio(by[NF4].times, base.times)
    checks = {
        "peak memory NF4 / bf16": (by[NF4].peak / base.peak, "", 0.45),
        "step time NF4 / bf16": (time_ratio, f" [{tlo:.3f}, {thi:.3f}]", 1.5),
    }
    lines.append("")
    for name, (value, spread, limit) in checks.items():
        lines.append(f"- {name}: {value:.3f}{spread} (target <= {limit}) {'PASS' if value <= limit else 'MISS'}")
    lines += ["", QWIX_NOTE]
    return "\n".join(lines), {k: v[0] for k, v in checks.items()}


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=1)
    a = ap.parse_args(argv)
    print(
        f"# {a.layers} x ({a.d_model} -> {a.d_ff} -> {a.d_model}) bf16 MLP blocks, {a.tokens} tokens, rank {a.rank}, "
        f"backend={jax.default_backend()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    rows, per_param = build_rows(a.layers, a.d_model, a.d_ff, a.tokens, a.rank)
    measure(rows, a.steps, a.warmup)
    text, checks = table(rows, per_param)
    print(text)
    return checks


if __name__ == "__main__":
    main()
