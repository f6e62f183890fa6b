"""The demo's final summary table and its machine-readable results."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:5.1f}%"


def _size(n: int) -> str:
    for unit, k in (("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def format_report(r: dict[str, Any]) -> str:
    """The summary table printed at the end of the demo, from the results dict.

    >>> r = {"model": {"description": "GPT", "params": 1000, "bytes": 4000},
    ...      "adapter": {"description": "rank 4", "params": 10, "bytes": 40, "trainable_percent": 0.99,
    ...                  "orbax_bytes": 900, "peft_bytes": 500},
    ...      "mode": "factored", "old_task": "add", "new_task": "sub", "eval_problems": 100,
    ...      "pretrain": {"steps": 5, "steps_per_second": 2.0, "seconds": 3.0},
    ...      "finetune": {"steps": 5, "steps_per_second": 4.0, "seconds": 2.0},
    ...      "accuracy": {"base_before": {"add": 0.9, "sub": 0.0}, "base_after": {"add": 0.9, "sub": 0.0},
    ...                   "adapted": {"add": 0.5, "sub": 0.8}, "reloaded_orbax": {"sub": 0.8},
    ...                   "reloaded_peft": {"sub": 0.8}},
    ...      "checks": {"reload_reproduces_accuracy": True}, "files": {}}
    >>> lines = format_report(r).splitlines()
    >>> lines[0]
    "lora_jax demo: factored LoRA, pretrained on 'add', adapted to 'sub'"
    >>> [line for line in lines if line.startswith("base + LoRA")]
    ['base + LoRA adapter             50.0%   80.0%']
    """
    acc = r["accuracy"]
    old, new = r["old_task"], r["new_task"]
    m, a = r["model"], r["adapter"]
    rows = [
        ("base model, before fine-tune", acc["base_before"]),
        ("base model, after fine-tune", acc["base_after"]),
        ("base + LoRA adapter", acc["adapted"]),
        ("adapter reloaded (orbax)", acc.get("reloaded_orbax", {})),
        ("adapter reloaded (PEFT files)", acc.get("reloaded_peft", {})),
    ]
    w = max(len(name) for name, _ in rows)
    lines = [
        f"lora_jax demo: {r['mode']} LoRA, pretrained on {old!r}, adapted to {new!r}",
        "=" * 72,
        f"{'model':<16}{m['description']}: {m['params']:,} params, {_size(m['bytes'])}",
        f"{'adapter':<16}{a['description']}: {a['params']:,} params, {_size(a['bytes'])} "
        f"({a['trainable_percent']:.2f}% of all params trainable)",
        f"{'adapter files':<16}orbax checkpoint {_size(a['orbax_bytes'])}, PEFT export {_size(a['peft_bytes'])} "
        f"(model: {_size(m['bytes'])})",
    ]
    for name, key in (("pretrain", "pretrain"), ("fine-tune", "finetune")):
        t = r[key]
        lines.append(
            f"{name:<16}{t['steps']:,} steps in {t['seconds']:.1f} s, {t['steps_per_second']:.1f} steps/s after compile"
        )
    lines += [
        "",
        f"{'accuracy':<{w}}  {old:>6}  {new:>6}   (exact match, greedy decoding, {r['eval_problems']:,} held-out problems)",
        *(f"{name:<{w}}  {_pct(v.get(old)):>6}  {_pct(v.get(new)):>6}" for name, v in rows),
        "",
        *(f"check: {k.replace('_', ' ')}: {'yes' if v else 'NO'}" for k, v in r["checks"].items()),
        *(f"wrote {k}: {v}" for k, v in r["files"].items()),
    ]
    return "\n".join(lines)


def write_json(path: str | os.PathLike, results: dict[str, Any]) -> pathlib.Path:
    """Write ``results`` as indented JSON and return the path."""
    path = pathlib.Path(path)
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path
