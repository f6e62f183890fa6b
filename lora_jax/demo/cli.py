"""``python -m lora_jax demo``: pretrain a small GPT on addition, LoRA-adapt it to subtraction.

Every number printed is measured in this run: accuracies are exact-match
rates of greedy decoding on held-out problems, speeds are wall-clock.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_jax
from lora_jax.demo import model as demo_model
from lora_jax.demo import plot, report, train
from lora_jax.demo.tasks import Task
from lora_jax.models.gpt import lora_axes


def parser() -> argparse.ArgumentParser:
    """The demo's command-line flags."""
    p = argparse.ArgumentParser(
        prog="python -m lora_jax demo",
        description="Pretrain a small GPT on multi-digit addition, then LoRA-adapt it to subtraction; "
        "report accuracy before/after, trainable %, adapter size, speed; save, export and reload the adapter.",
    )
    p.add_argument("--pretrain-steps", type=int, default=600, help="full-parameter steps on the old task")
    p.add_argument("--finetune-steps", type=int, default=600, help="adapter-only steps on the new task")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--digits", type=int, default=3, help="digits per operand")
    p.add_argument("--rank", type=int, default=2, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 * rank)")
    p.add_argument("--targets", default="all-linear", help="'all-linear' or comma-separated kernel names")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="pretraining peak learning rate")
    p.add_argument("--lora-lr", type=float, default=3e-3, help="fine-tuning peak learning rate")
    p.add_argument("--eval-size", type=int, default=1000, help="held-out problems per accuracy")
    p.add_argument(
        "--mode",
        choices=("auto", "factored", "materialized"),
        default="auto",
        help="how the adapted model runs during fine-tuning (auto: factored if it works)",
    )
    p.add_argument("--out", default="lora_jax_demo_out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _example(digits: int) -> tuple[int, int]:
    """Two example operands with ``digits`` digits (123 and 456 for 3)."""
    return int(("123456789" * digits)[:digits]), int(("456789123" * digits)[:digits])


def _nbytes(tree: Any) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


def _dir_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _pick_mode(mode: str, apply: Any, params: Any, lora: Any, seq: jax.Array) -> tuple[str, str]:
    """The fine-tuning mode and why: ``auto`` takes factored when every adapted kernel factors."""
    if mode != "auto":
        return mode, "as requested"
    try:
        rules = lora_jax.factored(apply).explain(params, lora, seq)
    except ValueError as e:  # FactoredError: a kernel reached an operation that cannot be factored
        return "materialized", f"factored failed: {str(e).splitlines()[0]}"
    unused = [p for p, r in rules.items() if not r]
    if unused:
        return "materialized", f"factored left kernels unused: {unused}"
    return "factored", "every adapted kernel runs as x·W + s·(x·A)·B"


def _same_tree(a: Any, b: Any) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same_structure = jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    return same_structure and all(bool(jnp.array_equal(x, y)) for x, y in zip(la, lb, strict=True))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the demo described by parsed ``args``; return the results dict (also written to results.json)."""
    out = pathlib.Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    say = print
    old, new = Task("add", args.digits), Task("sub", args.digits)
    model = demo_model.make_model(old, d_model=args.d_model, heads=args.heads, layers=args.layers)
    cfg = model.cfg
    params = model.init(jax.random.key(args.seed), jnp.zeros((1, old.seq_len - 1), jnp.int32))["params"]
    test = {t.op: t.batch(np.random.default_rng(10_000 + args.seed), args.eval_size, split="test") for t in (old, new)}
    answers = jax.jit(lambda p, seq: demo_model.greedy_answers(model.apply, p, seq, old))

    def accuracies(p: Any, tasks: tuple[Task, ...] = (old, new)) -> dict[str, float]:
        return {t.op: demo_model.accuracy(answers, p, test[t.op], t) for t in tasks}

    say(
        f"[1/5] pretraining every parameter on {old.op!r} ({args.digits}-digit operands, e.g. {old.text(*_example(args.digits))}; "
        f"answers are written least-significant digit first)"
    )
    pre = train.pretrain(
        model,
        params,
        old,
        steps=args.pretrain_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed + 1,
        progress=not args.no_progress,
    )
    params = pre.state
    base_frozen = jax.tree_util.tree_map(jnp.copy, params)
    base_before = accuracies(params)
    say(f"      base accuracy: {old.op} {base_before[old.op]:.1%}, {new.op} {base_before[new.op]:.1%} (before LoRA)")

    targets = args.targets if args.targets == "all-linear" else args.targets.split(",")
    alpha = 2.0 * args.rank if args.alpha is None else args.alpha
    spec = lora_jax.LoraSpec(rank=args.rank, alpha=alpha, targets=targets, axes=lora_axes(cfg))
    lora = lora_jax.init_lora(jax.random.key(args.seed + 2), params, spec)
    summ = lora_jax.summary(params, lora)
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    mode, why = _pick_mode(args.mode, apply, params, lora, jnp.asarray(test[new.op][:2, :-1]))
    say(
        f"[2/5] LoRA fine-tuning on {new.op!r} (e.g. {new.text(*_example(args.digits)[::-1])}): rank {args.rank} on {len(summ.rows)} "
        f"kernels, {summ.trainable_params:,} of {summ.total_params:,} params trainable "
        f"({summ.trainable_percent:.2f}%); mode {mode} ({why})"
    )
    ft = train.finetune(
        model,
        params,
        lora,
        new,
        mode=mode,
        steps=args.finetune_steps,
        batch_size=args.batch_size,
        lr=args.lora_lr,
        seed=args.seed + 3,
        progress=not args.no_progress,
    )
    lora = ft.state
    merged = lora_jax.merge(params, lora)  # for inference: plain weights, no adapter overhead
    adapted = accuracies(merged)
    base_after = accuracies(params)
    say(f"      adapted accuracy: {new.op} {adapted[new.op]:.1%}, {old.op} {adapted[old.op]:.1%}")

    say("[3/5] saving the adapter (orbax) and exporting it in PEFT format")
    ckpt = lora_jax.save_adapter(out / "adapter", lora, spec, overwrite=True)
    peft_dir = lora_jax.export_peft(out / "peft_adapter", lora, spec, overwrite=True)

    say("[4/5] reloading both and measuring again")
    lora_orbax, spec_orbax = lora_jax.load_adapter(ckpt, params=params, spec=spec)
    lora_peft, _ = lora_jax.import_peft(peft_dir, params, axes=lora_axes(cfg))
    reloaded_orbax = accuracies(lora_jax.merge(params, lora_orbax), (new,))
    reloaded_peft = accuracies(lora_jax.merge(params, lora_peft), (new,))

    say("[5/5] writing the loss curves and results")
    png = plot.plot_losses(
        out / "loss_curves.png",
        {f"pretrain: all params, {old.op}": pre.losses, f"LoRA fine-tune ({mode}): {new.op}": ft.losses},
        title=f"lora_jax demo: GPT d_model={cfg.d_model}, {cfg.layers} layers; LoRA rank {args.rank}",
        diagnostics=ft.metrics,
    )
    model_bytes = _nbytes(params)
    results = {
        "args": vars(args),
        "jax": {
            "version": jax.__version__,
            "backend": jax.default_backend(),
            "devices": jax.device_count(),
            "cpu_count": os.cpu_count(),
        },
        "mode": mode,
        "mode_reason": why,
        "old_task": old.op,
        "new_task": new.op,
        "eval_problems": args.eval_size,
        "model": {
            "description": f"GPT d_model={cfg.d_model} layers={cfg.layers} heads={cfg.heads} d_ff={cfg.d_ff}",
            "params": summ.base_params,
            "bytes": model_bytes,
        },
        "adapter": {
            "description": f"LoRA rank {args.rank} alpha {alpha:g} on {len(summ.rows)} kernels ({args.targets})",
            "params": summ.trainable_params,
            "bytes": summ.trainable_bytes,
            "trainable_percent": summ.trainable_percent,
            "orbax_bytes": _dir_bytes(ckpt),
            "peft_bytes": _dir_bytes(peft_dir),
        },
        "pretrain": _run_record(args.pretrain_steps, pre),
        "finetune": _run_record(args.finetune_steps, ft),
        "accuracy": {
            "base_before": base_before,
            "base_after": base_after,
            "adapted": adapted,
            "reloaded_orbax": reloaded_orbax,
            "reloaded_peft": reloaded_peft,
        },
        "checks": {
            "base_params_untouched": _same_tree(params, base_frozen),
            "orbax_reload_identical_arrays": _same_tree(lora, lora_orbax) and spec_orbax == spec,
            "reload_reproduces_accuracy": reloaded_orbax[new.op] == adapted[new.op]
            and reloaded_peft[new.op] == adapted[new.op],
        },
        "files": {
            "adapter": str(ckpt),
            "peft": str(peft_dir),
            "loss_curves": str(png),
            "results": str(out / "results.json"),
        },
    }
    report.write_json(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the demo with command-line ``argv`` (default ``sys.argv[1:]``); return the exit status.

    The status is 0 when the run completed and its checks passed (base params
    untouched, the reloaded adapters reproduce the accuracy), 1 otherwise.
    """
    args = parser().parse_args(argv)
    for flag in ("pretrain_steps", "finetune_steps", "eval_size", "batch_size"):
        if getattr(args, flag) < 1:
            parser().error(f"--{flag.replace('_', '-')} must be at least 1; found {getattr(args, flag)}")
    start = time.perf_counter()
    results = run(args)
    results["total_seconds"] = time.perf_counter() - start
    report.write_json(pathlib.Path(results["files"]["results"]), results)
    print()
    print(report.format_report(results))
    print(
        f"total time {results['total_seconds']:.1f} s on {jax.default_backend()} ({os.cpu_count()} CPU cores visible)"
    )
    ok = all(results["checks"].values()) and not math.isnan(results["finetune"]["last_loss"])
    return 0 if ok else 1


def _run_record(steps: int, run: Any) -> dict[str, float]:
    """One training run (pretrain or fine-tune) as it appears in results.json."""
    return {
        "steps": steps,
        "seconds": run.seconds,
        "steps_per_second": run.steps_per_second,
        "first_loss": float(run.losses[0]),
        "last_loss": float(run.losses[-1]),
        **({"diagnostics_first": {k: float(v[0]) for k, v in run.metrics.items()},
            "diagnostics_last": {k: float(v[-1]) for k, v in run.metrics.items()}} if run.metrics else {}),
    }  # fmt: skip
