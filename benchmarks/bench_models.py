"""LoRA training step on the JAX stack's own models: qwix's LoRA vs ``apply_lora`` vs ``factored``.

Models: google-tunix's NNX Llama3, Qwen3 and Gemma3 (random weights, float32)
and the benchmark decoder (``gpt_variants.PlainNnxGPT``, the decoder of
``lora_jax.models.gpt`` in NNX). LoRA of rank ``r`` (alpha = 2r) on the seven
projections (q, k, v, o, gate, up, down; Gemma3's fused ``kv_einsum`` is one
kernel), adam, one step = loss + gradients + update with the trained state
donated. Every row starts from the same base and the same adapters:

* ``qwix``: ``qwix.apply_lora_to_model`` (what tunix trains with), its
  ``nnx.LoRAParam`` values set to lora_jax's initial A and B;
* ``apply_lora``: ``fn(lora_jax.apply_lora(state, lora), ...)``;
* ``factored[...]``: ``lora_jax.factored(fn, strategy=...)`` for each strategy
  named in ``--strategies``; ``default`` is ``factored(fn)``.

Per grid point the rows run round-robin (the order rotating each round), so
machine noise hits every row alike; a ratio is the median over rounds of the
per-round ratio, with its quartiles. Peak memory is
``compiled.memory_analysis()`` (arguments + outputs - aliased + temporaries),
FLOPs are ``compiled.cost_analysis()``. Before timing, each point checks that
every row computes the same loss and the same adapter gradients as
``apply_lora`` (``--check-tol``).

    pip install -e ".[bench]" && pip install "transformers<5"   # google-tunix, qwix
    python benchmarks/bench_models.py                        # the named grid (GRID below), 30 rounds
    python benchmarks/bench_models.py --points llama3-512-r8 --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_factored import Row

import lora_jax
from lora_jax.factored import _strategy

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_einsum", "kv_einsum", "attn_vec_einsum")
PROJECTIONS += ("gate_proj", "up_proj", "down_proj", "query", "key", "value", "out", "mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class Point:
    """One grid point: a model family, its size, the remat config, tokens per step (batch x seq) and the rank."""

    family: str  # llama3 | qwen3 | gemma3 | decoder
    layers: int
    d: int
    remat: str  # NONE | BLOCK (tunix's RematConfig; the decoder's per-block jax.checkpoint)
    batch: int
    seq: int
    rank: int

    @property
    def name(self) -> str:
        remat = "-remat" if self.remat != "NONE" else ""
        size = f"-{self.layers}x{self.d}" if (self.layers, self.d) != (2, 256) else ""
        return f"{self.family}{size}{remat}-{self.batch * self.seq}-r{self.rank}"


GRID = (
    Point("llama3", 2, 256, "NONE", 4, 128, 8),
    Point("llama3", 2, 256, "BLOCK", 4, 128, 8),
    Point("qwen3", 2, 256, "NONE", 4, 128, 8),
    Point("qwen3", 2, 256, "BLOCK", 4, 128, 8),
    Point("gemma3", 2, 256, "NONE", 4, 128, 8),
    Point("gemma3", 2, 256, "BLOCK", 4, 128, 8),
    Point("llama3", 2, 256, "NONE", 1, 128, 8),
    Point("llama3", 2, 256, "NONE", 4, 512, 8),
    Point("llama3", 2, 256, "NONE", 4, 128, 64),
    Point("qwen3", 2, 256, "BLOCK", 4, 512, 64),
    Point("gemma3", 2, 256, "NONE", 4, 512, 64),
    Point("llama3", 4, 512, "NONE", 4, 256, 8),
    Point("decoder", 2, 256, "NONE", 4, 128, 8),
    Point("decoder", 2, 256, "BLOCK", 4, 512, 64),
    Point("llama3", 2, 256, "NONE", 1, 16, 8),  # few rows (below every kernel's break-even): for the auto rule
)
VOCAB = 1024


def build_model(p: Point) -> tuple[nnx.Module, Callable[[nnx.Module, jax.Array], jax.Array]]:
    """The NNX model of a grid point (random weights) and ``call(model, tokens) -> logits``."""
    heads, head_dim = p.d // 64, 64
    if p.family == "decoder":
        from gpt_variants import PlainNnxGPT

        from lora_jax.models.gpt import GPTConfig

        cfg = GPTConfig(vocab=VOCAB, d_model=p.d, heads=heads, layers=p.layers, d_ff=4 * p.d, max_len=p.seq)
        cfg = dataclasses.replace(cfg, remat=p.remat != "NONE")
        return PlainNnxGPT(cfg, nnx.Rngs(0), tunix_remat=True), lambda m, t: m(t)  # remat as tunix: qwix sees it
    if p.family == "gemma3":
        from tunix.models.gemma3 import model as gemma3

        cfg = gemma3.ModelConfig(
            num_layers=p.layers, num_embed=VOCAB, embed_dim=p.d, hidden_dim=4 * p.d, num_heads=heads,
            head_dim=head_dim, num_kv_heads=heads // 2, sliding_window_size=64,
            remat_config=getattr(gemma3.RematConfig, p.remat), param_dtype=jnp.float32,
        )  # fmt: skip
        model = gemma3.Gemma3(cfg, rngs=nnx.Rngs(0))
    else:
        module = __import__(f"tunix.models.{p.family}.model", fromlist=["model"])
        cfg = module.ModelConfig(
            num_layers=p.layers, vocab_size=VOCAB, embed_dim=p.d, hidden_dim=4 * p.d, num_heads=heads,
            head_dim=head_dim, num_kv_heads=heads // 2, rope_theta=10_000, norm_eps=1e-6,
            remat_config=getattr(module.RematConfig, p.remat),
        )  # fmt: skip
        cls = {"llama3": "Llama3", "qwen3": "Qwen3"}[p.family]
        model = getattr(module, cls)(cfg, rngs=nnx.Rngs(0))

    def call(m: nnx.Module, tokens: jax.Array) -> jax.Array:
        b, t = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(t), (b, t))
        mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))
        logits, _ = m(tokens, positions, None, mask)
        return logits.astype(jnp.float32)

    return model, call


def cross_entropy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


@contextlib.contextmanager
def _auto_threshold(value: float | None) -> Iterator[None]:
    """Trace with ``factored(strategy="auto")``'s threshold for this backend set to ``value`` (None: as it is)."""
    table, backend = _strategy.AUTO_THRESHOLD, jax.default_backend()
    old = table.get(backend)
    if value is not None:
        table[backend] = value
    try:
        yield
    finally:
        if value is not None:
            table.pop(backend) if old is None else table.__setitem__(backend, old)


def _untied(state: Any) -> Any:
    """``state`` with Gemma's tied embedding as an integer leaf, which ``infer_axes`` does not follow.

    The embedding is not a target; used by a lookup and by the tied output
    projection, it has two layouts and ``infer_axes`` would refuse it.
    """

    def leaf(path: tuple, x: Any) -> Any:
        tied = "input_embedding" in jax.tree_util.keystr(path)
        return jax.ShapeDtypeStruct(x.shape, jnp.int32) if tied else x

    return jax.tree_util.tree_map_with_path(leaf, state)


def _targets(axes: dict[str, str]) -> list[str]:
    return sorted(k for k in axes if any(f"/{name}/" in f"/{k}" for name in PROJECTIONS))


def _qwix_model(p: Point, model: nnx.Module, call: Callable, tokens: jax.Array, lora: dict) -> nnx.Module:
    """``model`` with qwix's LoRA on the same kernels, its A and B set to ``lora``'s."""
    import qwix

    items = lora_jax.adapter_items(lora)
    paths = sorted("inner/" + k.rsplit("/", 1)[0] for k in items)  # module paths, e.g. inner/layers/0/attn/q_proj
    provider = qwix.LoraProvider(module_path="|".join(paths), rank=p.rank, alpha=2.0 * p.rank)
    wrapped = _CallAsModule(model, call)
    qmodel = qwix.apply_lora_to_model(wrapped, provider, tokens, rngs=nnx.Rngs(3))
    flat = dict(nnx.to_flat_state(nnx.state(qmodel, nnx.LoRAParam)))
    assert len(flat) == 2 * len(items), f"qwix made {len(flat)} LoRA arrays for {len(items)} kernels"
    for path, node in items.items():
        for factor, value in (("a", node.a), ("b", node.b)):
            var = flat[_qwix_key(path, factor)]
            if var.get_value().shape != value.shape:  # qwix's dot_general form flattens multi-axis factors
                value = value.reshape(var.value.shape)
            var.set_value(jnp.asarray(value))
    return qmodel


class _CallAsModule(nnx.Module):
    """Wraps a model and its call convention so that qwix sees ``module(tokens)`` (module paths get ``inner/``)."""

    def __init__(self, inner: nnx.Module, call: Callable):
        self.inner, self.call = inner, call

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return self.call(self.inner, tokens)


def build_rows(
    p: Point, strategies: list[str], check_tol: float, lora_fa: bool = False
) -> tuple[list[Row], dict[str, float]]:
    model, call = build_model(p)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, VOCAB, (p.batch, p.seq)), jnp.int32)
    graphdef, state = nnx.split(model)
    fn = lambda s, t: call(nnx.merge(graphdef, s), t)  # noqa: E731
    axes = lora_jax.infer_axes(fn, _untied(state), tokens)
    spec = lora_jax.LoraSpec(rank=p.rank, alpha=2.0 * p.rank, targets=_targets(axes), axes=axes, init="random")
    lora = lora_jax.init_lora(jax.random.key(1), state, spec)
    lora = jax.tree.map(lambda v: 0.02 * jnp.asarray(rng.standard_normal(v.shape), v.dtype), lora)  # B != 0
    tx = optax.adam(1e-4)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (each row owns its donated buffers)

    losses: dict[str, Callable] = {}
    losses["apply_lora"] = lambda lo, s, t: cross_entropy(fn(lora_jax.apply_lora(s, lo), t), t)
    for strategy in strategies:
        name, _, threshold = strategy.partition(":")  # "auto:0.5": "auto" with that threshold (for tuning it)
        wrapped = lora_jax.factored(fn) if name == "default" else lora_jax.factored(fn, strategy=name)

        def loss(lo: Any, s: Any, t: jax.Array, w: Callable = wrapped, threshold: str = threshold) -> jax.Array:
            with _auto_threshold(float(threshold) if threshold else None):  # read when the step is traced
                return cross_entropy(w(s, lo, t), t)

        losses[f"factored[{strategy}]"] = loss
    specs = {name: (jax.value_and_grad(loss), lora, state) for name, loss in losses.items()}
    if lora_fa:  # LoRA-FA: the same adapters with A frozen (lora_jax.split keeps it out of the trained tree)
        fa = jax.tree.map(
            lambda n: dataclasses.replace(n, frozen=("a",)), lora, is_leaf=lambda n: isinstance(n, lora_jax.LoraWeights)
        )
        trained_fa, frozen_fa = lora_jax.split(fa)
        first = next(n for n in losses if n.startswith("factored["))
        fa_loss = lambda tr, s, t, loss=losses[first]: loss(lora_jax.combine(tr, frozen_fa), s, t)  # noqa: E731
        specs[f"{first} LoRA-FA"] = (jax.value_and_grad(fa_loss), trained_fa, state)

    qmodel = _qwix_model(p, model, call, tokens, lora)
    qdef, qlora, qrest = nnx.split(qmodel, nnx.LoRAParam, ...)

    def qwix_value_and_grad(lo: Any, rest: Any, t: jax.Array) -> tuple[jax.Array, Any]:
        # tunix's way (nnx.value_and_grad over the LoRAParam state): jax.grad over a merged qwix model
        # fails under tunix's nnx.remat blocks (flax TraceContextError), this works with and without remat
        diff = nnx.DiffState(0, nnx.LoRAParam)
        return nnx.value_and_grad(lambda m: cross_entropy(m(t), t), argnums=diff)(nnx.merge(qdef, lo, rest))

    specs["qwix"] = (qwix_value_and_grad, qlora, qrest)

    diffs = _check_same_function(specs, tokens, lora, check_tol)
    rows = []
    for name in ["qwix", *losses, *(n for n in specs if n.endswith("LoRA-FA"))]:
        value_and_grad, trained, base = specs[name]
        step = _train_step(value_and_grad, tx)
        rows.append(Row(name, step, (copy(trained), tx.init(trained), base, tokens), (0, 1), True))
    return rows, diffs


def _train_step(value_and_grad: Callable, tx: optax.GradientTransformation) -> Callable:
    def step(trained: Any, opt_state: Any, *rest: Any) -> tuple[Any, Any, jax.Array]:
        value, grads = value_and_grad(trained, *rest)
        updates, opt_state = tx.update(grads, opt_state, trained)
        return optax.apply_updates(trained, updates), opt_state, value

    return step


def _qwix_key(path: str, factor: str) -> tuple:
    """qwix's flat-state key of factor ``a``/``b`` of lora_jax's adapter at ``path``."""
    module, leaf = path.rsplit("/", 1)
    key = (*("inner/" + module).split("/"), f"{leaf}_lora_{factor}")
    return tuple(int(k) if k.isdigit() else k for k in key)


def _as_lora(name: str, grads: Any, lora: dict) -> dict:
    """Gradients of one row in lora_jax's adapter structure (qwix's mapped back by path)."""
    if name != "qwix":
        return lora_jax.adapter_items(grads)
    flat = dict(nnx.to_flat_state(grads))
    return {
        path: dataclasses.replace(
            node, **{f: flat[_qwix_key(path, f)].get_value().reshape(getattr(node, f).shape) for f in "ab"}
        )
        for path, node in lora_jax.adapter_items(lora).items()
    }


def _check_same_function(specs: dict, tokens: jax.Array, lora: dict, tol: float) -> dict[str, float]:
    """Every row's loss and adapter gradients equal apply_lora's, relative to the gradient's scale."""
    ref_loss, ref = jax.jit(specs["apply_lora"][0])(lora, specs["apply_lora"][2], tokens)
    diffs = {}
    for name, (value_and_grad, trained, base) in specs.items():
        value, grads = jax.jit(value_and_grad)(trained, base, tokens)
        grads, want = _as_lora(name, grads, lora), lora_jax.adapter_items(ref)
        rel = [
            float(jnp.max(jnp.abs(g - r)) / (jnp.max(jnp.abs(r)) + 1e-30))
            for path in want
            for g, r in zip((grads[path].a, grads[path].b), (want[path].a, want[path].b), strict=True)
            if g is not None  # LoRA-FA trains B only
        ]
        diffs[name] = max(abs(float(value) - float(ref_loss)), *rel)
        if diffs[name] > tol:
            raise AssertionError(f"{name}: loss/gradients differ from apply_lora's by {diffs[name]:.2e} > {tol}")
    return diffs


def measure(rows: list[Row], rounds: int, warmup: int) -> None:
    for _ in range(warmup):
        for row in rows:
            row.run()
    for i in range(rounds):
        k = i % len(rows)
        for row in rows[k:] + rows[:k]:
            row.times.append(row.run())


def paired(a: Row, b: Row) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``a``'s step time over ``b``'s in the same round."""
    r = np.asarray(a.times) / np.asarray(b.times)
    return float(np.median(r)), float(np.percentile(r, 25)), float(np.percentile(r, 75))


def report(p: Point, rows: list[Row], subject: str) -> tuple[list[str], dict[str, float]]:
    """Table lines for one point and the subject row's ratios to the better peer (time) and memory."""
    by = {r.name: r for r in rows}
    peers = [by["qwix"], by["apply_lora"]]
    fastest = min(peers, key=lambda r: np.median(r.times))
    smallest = min(r.peak for r in peers)
    lines = []
    for r in rows:
        q = paired(r, by["qwix"])
        m = paired(r, by["apply_lora"])
        lines.append(
            f"| {p.name} | {r.name} | {np.median(r.times) * 1e3:.1f} | {q[0]:.3f} [{q[1]:.3f}, {q[2]:.3f}] | "
            f"{m[0]:.3f} [{m[1]:.3f}, {m[2]:.3f}] | {r.peak / 2**20:.1f} | {r.peak / smallest:.3f} | "
            f"{r.flops / by['apply_lora'].flops:.3f} | {r.compile_s:.1f} |"
        )
    time_ratio = paired(by[subject], fastest)
    return lines, {"time": time_ratio[0], "time_q1": time_ratio[1], "time_q3": time_ratio[2],
                   "memory": by[subject].peak / smallest}  # fmt: skip


HEADER = (
    "| point | row | median step (ms) | / qwix [25%, 75%] | / apply_lora [25%, 75%] | peak (MiB) "
    "| / smaller peer | FLOPs / apply_lora | compile (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", default="all", help="comma-separated point names (see GRID), or all")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--strategies", default="default", help="comma-separated factored strategies to time")
    parser.add_argument(
        "--subject", default=None, help="the row the targets are checked for (default: the first strategy's)"
    )
    parser.add_argument("--check-tol", type=float, default=1e-4)
    parser.add_argument("--lora-fa", action="store_true", help="add a LoRA-FA row (A frozen) of the first strategy")
    args = parser.parse_args(argv)
    points = GRID if args.points == "all" else [p for p in GRID if p.name in args.points.split(",")]
    if not points:
        parser.error(f"--points {args.points!r} names no grid point; known: {', '.join(p.name for p in GRID)}")
    strategies = args.strategies.split(",")
    subject = args.subject or f"factored[{strategies[0]}]"
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, {args.rounds} rounds", flush=True)
    print(HEADER, flush=True)
    results, summary = {}, []
    for p in points:
        rows, diffs = build_rows(p, strategies, args.check_tol, args.lora_fa)
        measure(rows, args.rounds, args.warmup)
        lines, ratios = report(p, rows, subject)
        print("\n".join(lines), flush=True)
        results[p.name] = ratios
        worst = max(diffs.values())
        ok = ratios["time"] <= 1.03 and ratios["memory"] <= 1.03
        summary.append(
            f"| {p.name} | {ratios['time']:.3f} [{ratios['time_q1']:.3f}, {ratios['time_q3']:.3f}] | "
            f"{ratios['memory']:.3f} | {worst:.1e} | {'PASS' if ok else 'MISS'} |"
        )
    print(f"\n{subject} against the better of qwix and apply_lora (target <= 1.03 in time and memory):")
    print("| point | time / faster peer [25%, 75%] | memory / smaller peer | max loss/grad diff | |")
    print("|---|---:|---:|---:|---|")
    print("\n".join(summary))
    return results


if __name__ == "__main__":
    main()
