"""Float64 NumPy reference formulas that the tests compare lora_jax against.

They use plain reshapes and matrix products, not the einsum equations of
``lora_jax.targets._layout``, so a wrong axis order in the library shows up as a
mismatch.
"""

from __future__ import annotations

import math

import numpy as np


def f64(x) -> np.ndarray:
    """A float64 NumPy copy of an array (bfloat16 included)."""
    return np.asarray(np.asarray(x).astype(np.float32), dtype=np.float64)


def delta_np(a, b, scale: float, layout: str) -> np.ndarray:
    """``scale * A @ B`` in float64, laid out in the kernel's axis order.

    A is ``(*batch, *in, r)`` and B ``(*batch, r, *out)``; the product is
    computed per batch index on the 2-D view ``(fan_in, r) @ (r, fan_out)``
    and the axes are then moved back to where ``layout`` puts them.
    """
    a, b = f64(a), f64(b)
    nb, ni = layout.count("b"), layout.count("i")
    batch = a.shape[:nb]
    ins, outs = a.shape[nb : nb + ni], b.shape[nb + 1 :]
    r = a.shape[-1]
    a2 = a.reshape(math.prod(batch), math.prod(ins), r)
    b2 = b.reshape(math.prod(batch), r, math.prod(outs))
    d = np.stack([a2[k] @ b2[k] for k in range(a2.shape[0])]).reshape(*batch, *ins, *outs) * scale
    # d's axes are ordered (batch..., in..., out...); the kernel's order is `layout`.
    grouped = [k for c in "bio" for k, lc in enumerate(layout) if lc == c]
    return np.moveaxis(d, list(range(len(layout))), grouped)


def apply_np(w, a, b, scale: float, layout: str) -> np.ndarray:
    """``W + scale * A @ B`` in float64."""
    return f64(w) + delta_np(a, b, scale, layout)


def kaiming_bound(fan_in: int) -> float:
    """PEFT's kaiming-uniform(a=sqrt(5)) bound: gain*sqrt(3/fan_in) = 1/sqrt(fan_in)."""
    gain = math.sqrt(2.0 / (1.0 + 5.0))
    return gain * math.sqrt(3.0 / fan_in)


def tolerance(dtype) -> dict[str, float]:
    """``rtol``/``atol`` for a result stored in ``dtype`` (one rounding of a float32 sum)."""
    return {"rtol": 1e-2, "atol": 1e-2} if np.dtype(dtype).itemsize == 2 else {"rtol": 1e-6, "atol": 1e-6}


def bf16_half_ulp(x) -> np.ndarray:
    """Half the spacing of bfloat16 numbers just below ``|x|`` (8 significant bits): the error of one rounding."""
    x = np.abs(np.asarray(x, np.float64))
    exponent = np.floor(np.log2(np.where(x > 0, x, 1.0)))
    return np.where(x > 0, 2.0 ** (exponent - 8), 2.0**-133)


def f32_update_error(w, a, b, scale: float, layout: str) -> np.ndarray:
    """An elementwise bound on the float32 rounding error of ``W + scale * A @ B`` (before any final cast).

    ``r`` float32 products and additions each round with relative error ``2**-24``, so the error is at
    most about ``(r + 2) * 2**-24 * (|W| + scale * |A| @ |B|)``; a factor 2 covers the scaling.
    """
    rank = np.asarray(a).shape[-1]
    magnitude = np.abs(f64(w)) + delta_np(np.abs(f64(a)), np.abs(f64(b)), abs(scale), layout)
    return 2 * (rank + 2) * 2.0**-24 * magnitude
