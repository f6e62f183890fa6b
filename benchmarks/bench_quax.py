"""quax vs ``lora_jax.factored``: does quax run our GPT factored, correctly, and how fast?

The issue asked to pick the factored-execution mechanism by measurement: a
maintained interpreter library (quax) or our own jaxpr interpreter. This script
measures quax on ``lora_jax.models.gpt.GPT`` (linen) with LoRA on q/k/v/o and
both MLP kernels (``lora_axes(cfg)`` layouts), looped blocks and ``nn.scan``:

* ``quax LoraArray (stock)``: ``quax.examples.lora.LoraArray`` (``W + a @ b``
  with ``a (*batch, x, z)``, ``b (*batch, z, y)``). It only fits 2-D kernels,
  so the attention ``DenseGeneral`` kernels stay materialized (``apply_lora``)
  and only ``mlp_in``/``mlp_out`` are quax arrays.
* ``quax FactoredArray (ours)``: a ``quax.ArrayValue`` holding ``W, A, B, s`` in
  our layouts (``A (*in, r)``, ``B (r, *out)``) with a ``dot_general`` rule
  ``x·W + s·(x·A)·B`` for any number of in/out axes; every other primitive goes
  to quax's default (``materialise()``: ``W + s·AB``), counted at trace time.
* ``lora_jax.factored``: our interpreter, the reference row.

Per row: does it run, loss and adapter grads vs ``apply_lora`` (max relative
error), median / min step time of a jitted loss+grad step (rows interleaved,
order rotating every round), trace+compile time, FLOPs (``cost_analysis``) and
how many kernels were materialized. Then a probe: what each mechanism does when
a kernel meets a primitive it has no rule for (a bf16 cast, as flax's
``promote_dtype`` does with ``dtype=bfloat16``; a transpose).

quax is not a dependency of lora_jax; run this in a separate environment::

    pip install quax && python benchmarks/bench_quax.py --rounds 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import quax
from jax import lax
from jax.typing import ArrayLike
from quax.examples.lora import LoraArray

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lora_jax
from lora_jax.models.gpt import GPT, GPTConfig, cross_entropy, lora_axes

TARGETS = ["query", "key", "value", "out", "mlp_in", "mlp_out"]
MATERIALIZED: list[str] = []  # primitives for which FactoredArray was materialized (trace time)


class FactoredArray(quax.ArrayValue):
    """``W + s·A B`` kept factored; ``A (*batch, *in, r)``, ``B (*batch, r, *out)``."""

    w: jax.Array
    a: jax.Array
    b: jax.Array
    scale: float = eqx.field(static=True)

    @property
    def n_batch(self) -> int:
        return self.a.ndim + self.b.ndim - 2 - self.w.ndim

    @property
    def n_in(self) -> int:
        return self.a.ndim - 1 - self.n_batch

    def aval(self):
        return jax.core.ShapedArray(self.w.shape, self.w.dtype)

    def materialise(self):
        nb = self.n_batch
        batch = tuple(range(nb))
        dn = (((self.a.ndim - 1,), (nb,)), (batch, batch))
        return lax.stop_gradient(self.w) + self.scale * lax.dot_general(self.a, self.b, dn)

    @staticmethod
    def default(primitive, values, params):
        MATERIALIZED.append(primitive.name)
        arrays = [v.materialise() if isinstance(v, quax.Value) else v for v in values]
        return primitive.bind(*arrays, **params)


def _kw(kwargs: dict) -> dict:
    return {"precision": kwargs.get("precision"), "preferred_element_type": kwargs.get("preferred_element_type")}


@quax.register(lax.dot_general_p)
def _x_dot_kernel(lhs: ArrayLike, rhs: FactoredArray, *, dimension_numbers, **kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    if rhs.n_batch or lb or rb or tuple(rc) != tuple(range(rhs.n_in)):
        return FactoredArray.default(lax.dot_general_p, (lhs, rhs), dict(dimension_numbers=dimension_numbers, **kwargs))
    kw = _kw(kwargs)
    y = lax.dot_general(lhs, lax.stop_gradient(rhs.w), dimension_numbers, **kw)
    xa = lax.dot_general(lhs, rhs.a, ((lc, rc), ((), ())), **kw)
    return y + lax.dot_general(rhs.scale * xa, rhs.b, (((xa.ndim - 1,), (0,)), ((), ())), **kw)


@quax.register(lax.dot_general_p)
def _kernel_dot_x(lhs: FactoredArray, rhs: ArrayLike, *, dimension_numbers, **kwargs):
    (lc, rc), (lb, rb) = dimension_numbers
    if lhs.n_batch or lb or rb or tuple(lc) != tuple(range(lhs.n_in)):
        return FactoredArray.default(lax.dot_general_p, (lhs, rhs), dict(dimension_numbers=dimension_numbers, **kwargs))
    kw = _kw(kwargs)
    y = lax.dot_general(lax.stop_gradient(lhs.w), rhs, dimension_numbers, **kw)
    ax = lax.dot_general(lhs.a, rhs, ((lc, rc), ((), ())), **kw)  # (r, *x_free)
    return y + lax.dot_general(lhs.b, lhs.scale * ax, (((0,), (0,)), ((), ())), **kw)


def _wrap(params: Any, lora: Any, make: Callable[[str, jax.Array, Any], Any]) -> Any:
    """Replace each adapted kernel of ``params`` by ``make(path, W, node)``; other leaves unchanged."""
    items = lora_jax.adapter_items(lora)

    def leaf(path, w):
        key = "/".join(str(getattr(p, "key", p)) for p in path)
        return make(key, w, items[key]) if key in items else w

    return jax.tree_util.tree_map_with_path(leaf, params)


def make_ours(_: str, w: jax.Array, node: Any) -> Any:
    return FactoredArray(w=w, a=node.a, b=node.b, scale=float(node.scale))


def make_stock(path: str, w: jax.Array, node: Any) -> Any:
    if w.ndim - (1 if node.layout.startswith("b") else 0) != 2:  # (d,h,hd)/(h,hd,d): no fit, materialize
        return node.apply_to(w)
    arr = LoraArray(w, rank=node.rank, key=jax.random.key(0))  # raises if it would materialize
    return eqx.tree_at(lambda x: (x.a, x.b), arr, (node.a * node.scale, node.b))


def _fill(tree: Any, seed: int, scale: float = 0.02) -> Any:
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(scale * rng.standard_normal(s.shape), s.dtype), tree)


def setup(cfg: GPTConfig, rank: int):
    model = GPT(cfg)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab, (1, cfg.max_len)), jnp.int32)
    params = _fill(jax.eval_shape(model.init, jax.random.key(0), tokens)["params"], 0)
    spec = lora_jax.LoraSpec(rank=rank, alpha=2.0 * rank, targets=TARGETS, axes=lora_axes(cfg))
    lora = _fill(jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(1), params, spec)), 1)
    if cfg.dtype == "float64":  # the correctness check: parameters in float64 too
        params, lora = jax.tree.map(lambda x: x.astype(jnp.float64), (params, lora))
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    fac = lora_jax.factored(apply)
    losses = {
        "apply_lora (materialized)": lambda lo, p, t: cross_entropy(apply(lora_jax.apply_lora(p, lo), t), t),
        "lora_jax.factored": lambda lo, p, t: cross_entropy(fac(p, lo, t), t),
        "quax FactoredArray (ours)": lambda lo, p, t: cross_entropy(quax.quaxify(apply)(_wrap(p, lo, make_ours), t), t),
        "quax LoraArray (stock, mlp only)": lambda lo, p, t: cross_entropy(
            quax.quaxify(apply)(_wrap(p, lo, make_stock), t), t
        ),
    }
    if cfg.dtype == "float64":
        merge64 = lambda p, lo: _wrap(p, lo, lambda *k: make_ours(*k).materialise())  # noqa: E731
        losses["W + s·AB in float64"] = lambda lo, p, t: cross_entropy(apply(merge64(p, lo), t), t)
    return losses, (lora, params, tokens)


def _rel(x: Any, ref: Any) -> float:
    errs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30)), x, ref)
    return max(jax.tree.leaves(errs))


class Row:
    def __init__(self, name: str, loss: Callable, args: tuple, ref: Any):
        self.name, self.args, self.times = name, args, []
        self.error, self.rel, self.materialized = "", float("nan"), []
        step = jax.jit(jax.value_and_grad(loss))
        del MATERIALIZED[:]
        try:
            t0 = time.perf_counter()
            self.compiled = step.lower(*args).compile()
            self.compile_s = time.perf_counter() - t0
        except Exception as e:  # the failure is the measurement
            self.compiled, self.compile_s = None, float("nan")
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return
        self.materialized = list(MATERIALIZED)
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        self.flops = float(cost.get("flops", float("nan")))
        out = self.compiled(*args)
        if ref is not None:
            self.rel = max(_rel(out[0], ref[0]), _rel(out[1], ref[1]))
        self.out = out

    def run(self) -> None:
        t0 = time.perf_counter()
        jax.block_until_ready(self.compiled(*self.args))
        self.times.append(time.perf_counter() - t0)


def bench(cfg: GPTConfig, rank: int, rounds: int) -> list[Row]:
    losses, args = setup(cfg, rank)
    rows, ref = [], None
    for name, loss in losses.items():
        row = Row(name, loss, args, ref)
        if ref is None:
            ref = row.out
        rows.append(row)
        print(f"  {'scan' if cfg.scan else 'loop'}: {name}: {row.error or f'{row.compile_s:.1f} s'}", file=sys.stderr)
    live = [r for r in rows if r.compiled is not None]
    for r in live:  # warm-up
        r.run()
        r.times.clear()
    for i in range(rounds):
        k = i % len(live)
        for r in live[k:] + live[:k]:
            r.run()
    return rows


def probe() -> list[tuple[str, str, str]]:
    """What happens when an adapted kernel meets a primitive with no factored rule."""
    w, a, b = jnp.ones((8, 4)), jnp.ones((8, 2)), jnp.ones((2, 4))
    x = jnp.ones((3, 8))
    cases = {
        "bf16 cast then x @ W": lambda k: x.astype(jnp.bfloat16) @ k.astype(jnp.bfloat16),
        "x @ W.T.T (transpose)": lambda k: x @ k.T.T,
    }
    lw = lora_jax.LoraWeights(a=a, b=b, scale=1.0, layout="io")
    mechs = {
        "quax FactoredArray (ours)": lambda f: quax.quaxify(f)(FactoredArray(w=w, a=a, b=b, scale=1.0)),
        "quax LoraArray allow_materialise=False": lambda f: quax.quaxify(f)(
            eqx.tree_at(lambda t: (t.a, t.b), LoraArray(w, rank=2, key=jax.random.key(0)), (a, b))
        ),
        "quax LoraArray allow_materialise=True": lambda f: quax.quaxify(f)(
            eqx.tree_at(
                lambda t: (t.a, t.b), LoraArray(w, rank=2, key=jax.random.key(0), allow_materialise=True), (a, b)
            )
        ),
        "lora_jax.factored": lambda f: lora_jax.factored(lambda p: f(p["k"]))({"k": w}, {"k": lw}),
    }
    out = []
    for cname, fn in cases.items():
        for mname, run in mechs.items():
            del MATERIALIZED[:]
            try:
                jax.make_jaxpr(lambda run=run, fn=fn: run(fn))()
                res = f"ran; materialized for {MATERIALIZED}" if MATERIALIZED else "ran"
                if "allow_materialise=True" in mname:
                    res = "ran (W + a@b formed silently)"
            except Exception as e:
                res = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            out.append((cname, mname, res))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args(argv)
    print(f"jax {jax.__version__}, quax {quax.__version__}, {jax.devices()[0].platform}")
    print(f"GPT {a.layers} layers, d={a.d_model}, {a.seq} tokens, vocab {a.vocab}, rank {a.rank}; loss+grad step\n")
    configs = [
        ("looped", False, "float32"),
        ("nn.scan", True, "float32"),
        ("looped, dtype=bfloat16", False, "bfloat16"),
    ]
    results = []
    for blocks, scan, dtype in configs:
        cfg = GPTConfig(
            vocab=a.vocab, d_model=a.d_model, heads=a.heads, layers=a.layers, d_ff=4 * a.d_model,
            max_len=a.seq, scan=scan, dtype=dtype,
        )  # fmt: skip
        results.append((blocks, dtype, bench(cfg, a.rank, a.rounds)))
    jax.config.update("jax_enable_x64", True)  # correctness in float64: only the mechanism's error remains
    rel64 = {}
    for blocks, scan, _ in configs[:2]:
        cfg = GPTConfig(
            vocab=a.vocab, d_model=a.d_model, heads=a.heads, layers=a.layers, d_ff=4 * a.d_model,
            max_len=a.seq, scan=scan, dtype="float64",
        )  # fmt: skip
        losses, args = setup(cfg, a.rank)
        losses["apply_lora (materialized)"] = losses.pop("W + s·AB in float64")  # apply_lora adds it in float32
        ref = jax.jit(jax.value_and_grad(losses.pop("apply_lora (materialized)")))(*args)
        for name, loss in losses.items():
            rel64[blocks, name] = max(map(_rel, jax.jit(jax.value_and_grad(loss))(*args), ref))
    print(
        "| blocks | row | runs | max rel err vs apply_lora / vs W+sAB in f64 | median (ms) | min (ms) "
        "| trace+compile (s) | FLOPs / apply_lora | kernels materialized (trace time) |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for blocks, _, rows in results:
        ref_flops = rows[0].flops
        for r in rows:
            if r.compiled is None:
                print(f"| {blocks} | {r.name} | **no**: `{r.error}` | | | | | | |")
                continue
            err = (
                "reference"
                if r is rows[0]
                else f"{r.rel:.1e} / " + (f"{rel64[blocks, r.name]:.1e}" if (blocks, r.name) in rel64 else "n/a")
            )
            mat = f"{len(r.materialized)} ({', '.join(sorted(set(r.materialized)))})" if r.materialized else "0"
            if r.name.startswith("quax LoraArray"):
                mat = "attention q/k/v/o (no fit: apply_lora)" + ("" if mat == "0" else f"; {mat}")
            if r.name.startswith("apply_lora"):
                mat = "all (by design)"
            print(
                f"| {blocks} | {r.name} | yes | {err} | {1e3 * statistics.median(r.times):.1f} | "
                f"{1e3 * min(r.times):.1f} | {r.compile_s:.2f} | {r.flops / ref_flops:.3f} | {mat} |"
            )
    print("\nUnhandled primitive probe (kernel (8, 4), rank 2):\n")
    print("| case | mechanism | result |\n|---|---|---|")
    for case, mech, res in probe():
        print(f"| {case} | {mech} | {res} |")


if __name__ == "__main__":
    main()
