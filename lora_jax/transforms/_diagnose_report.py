"""Showing a :func:`lora_jax.diagnose` report: a text table like ``summary``'s, and a PNG."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import numpy as np


def _rows(report: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, np.ndarray]]]:
    """One row per kernel, or per layer of a stacked kernel (``path[k]``)."""
    out = []
    for path, metrics in report.items():
        m = {k: np.asarray(v, np.float64) for k, v in metrics.items()}
        batch = m["singular_values"].shape[:-1]
        if not batch:
            out.append((path, m))
            continue
        for k in np.ndindex(*batch):
            out.append((f"{path}[{','.join(map(str, k))}]", {name: v[k] for name, v in m.items()}))
    return out


def diagnosis_table(report: dict[str, dict[str, Any]], *, singular_values: int = 4) -> str:
    """The report as a table: one line per kernel (per layer for stacked kernels).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora, diagnose
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> print(diagnosis_table(diagnose(params, lora)).splitlines()[0])
      path          norm ratio  delta norm  eff. rank  top-1 energy  grad ratio  singular values
    """
    header = ("path", "norm ratio", "delta norm", "eff. rank", "top-1 energy", "grad ratio", "singular values")
    lines = []
    for path, m in _rows(report):
        fmt = lambda key, m=m: f"{float(m[key]):.4g}" if key in m else "-"  # noqa: E731
        sigma = m["singular_values"]
        shown = " ".join(f"{s:.3g}" for s in sigma[:singular_values]) + (" ..." if len(sigma) > singular_values else "")
        lines.append((path, fmt("norm_ratio"), fmt("delta_norm"), fmt("effective_rank"), fmt("energy_top_k"),
                      fmt("grad_ratio"), shown))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *lines]]
    return "\n".join([text[0], "  ".join("-" * w for w in widths), *text[1:]])


def plot_diagnosis(path: str | os.PathLike, report: dict[str, dict[str, Any]], *, title: str = "") -> pathlib.Path:
    """A PNG with two panels: the norm ratio per kernel (per layer), and each delta's spectrum ``sigma / sigma_1``.

    Uses matplotlib's Agg canvas (no display, pyplot untouched). Without
    ``norm_ratio`` (no base params) the first panel shows ``||delta||_F``.

    Example:
      >>> import os, tempfile, jax, jax.numpy as jnp
      >>> from lora_jax import LoraSpec, init_lora, diagnose
      >>> params = {"dense": {"kernel": jnp.eye(4)}}
      >>> lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["dense"], init="random"))
      >>> png = plot_diagnosis(os.path.join(tempfile.mkdtemp(), "d.png"), diagnose(params, lora))
      >>> png.read_bytes()[:4]
      b'\x89PNG'
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = _rows(report)
    ratio = all("norm_ratio" in m for _, m in rows)
    fig = Figure(figsize=(10, 4 + 0.12 * len(rows)))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    values = [float(m["norm_ratio"] if ratio else m["delta_norm"]) for _, m in rows]
    left.barh(range(len(rows)), values)
    left.set_yticks(range(len(rows)), [p for p, _ in rows], fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("||delta|| / ||W||" if ratio else "||delta||")
    if ratio:
        left.axvspan(0.1, 0.3, alpha=0.15, color="green", label="0.1-0.3")
        left.legend(fontsize=7)
    for name, m in rows:
        sigma = m["singular_values"]
        if sigma[0] > 0:
            right.plot(np.arange(1, len(sigma) + 1), sigma / sigma[0], marker=".", label=name)
    right.set_xlabel("singular value index")
    right.set_ylabel("sigma / sigma_1")
    right.set_yscale("log")
    if len(rows) <= 12:
        right.legend(fontsize=6)
    fig.suptitle(title or "LoRA diagnostics")
    fig.tight_layout()
    out = pathlib.Path(path)
    fig.savefig(out, dpi=100)
    return out


__all__ = ["diagnosis_table", "plot_diagnosis"]
