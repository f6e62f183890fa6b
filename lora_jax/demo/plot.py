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


def plot_losses(path: str | os.PathLike, curves: dict[str, np.ndarray], *, title: str = "") -> pathlib.Path:
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
    fig = Figure(figsize=(5 * len(curves), 3.6), layout="constrained")
    for ax, (name, losses) in zip(fig.subplots(1, len(curves), squeeze=False)[0], curves.items(), strict=True):
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
