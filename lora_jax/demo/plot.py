"""The demo's loss-curve figure (matplotlib, no display needed)."""

from __future__ import annotations

import os
import pathlib

import numpy as np


def smooth(x: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (the first values average what there is so far).

    >>> smooth(np.array([1.0, 3.0, 5.0]), 2).tolist()
    [1.0, 2.0, 4.0]
    """
    x = np.asarray(x, np.float64)
    c = np.cumsum(np.concatenate([[0.0], x]))
    k = np.arange(1, len(x) + 1)
    lo = np.maximum(k - window, 0)
    return (c[k] - c[lo]) / (k - lo)


def plot_losses(
    path: str | os.PathLike, curves: dict[str, np.ndarray], *, title: str = "", diagnostics: dict | None = None
) -> pathlib.Path:
    """Write a PNG with one panel per loss curve (log scale, raw and smoothed).

    Uses matplotlib's object API with the Agg canvas, so it needs no display
    and leaves pyplot's global state alone.

    >>> import tempfile, os
    >>> out = plot_losses(os.path.join(tempfile.mkdtemp(), "loss.png"), {"train": np.linspace(2, 1, 50)})
    >>> out.read_bytes()[:4] == b"\\x89PNG"
    True
    """
    from matplotlib.figure import Figure

    path = pathlib.Path(path)
    panels = len(curves) + bool(diagnostics)
    fig = Figure(figsize=(5 * panels, 3.6), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    if diagnostics:  # the fine-tune's adapter diagnostics, beside its loss
        ax = axes[-1]
        for name, values in diagnostics.items():
            ax.plot(np.arange(1, len(values) + 1), smooth(values, max(len(values) // 50, 1)), lw=1.5, label=name)
        ax.axhspan(0.1, 0.3, alpha=0.12, color="green", label="norm ratio 0.1-0.3")
        ax.set(title="LoRA diagnostics (fine-tune)", xlabel="step", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, (name, losses) in zip(axes, curves.items(), strict=False):
        steps = np.arange(1, len(losses) + 1)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
        ax.plot(steps, smooth(losses, max(len(losses) // 50, 1)), color="tab:blue", lw=1.8, label="smoothed")
        ax.set(title=name, xlabel="step", ylabel="cross-entropy (answer tokens)")
        if len(losses) and np.all(np.asarray(losses) > 0):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=110)
    return path
