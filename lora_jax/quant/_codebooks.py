"""Code books: the values a quantized code stands for, before the per-block absmax scale.

* ``"nf4"``: QLoRA's 4-bit NormalFloat, 16 quantiles of N(0, 1) scaled to [-1, 1]
  (the values bitsandbytes ships; a code is the index into the sorted table).
* ``"fp4"``: bitsandbytes' 4-bit float (1 sign, 2 exponent, 1 mantissa bit,
  bias 2), listed in bit-pattern order and divided by its largest magnitude.
* ``"int4"``: symmetric integers -7..7 stored as ``q + 8`` in a nibble.
* the 8-bit dynamic map (signed, 7 exponent bits) that double quantization uses
  for the absmax statistics.
"""

from __future__ import annotations

import functools

import numpy as np

FOUR_BIT = ("nf4", "fp4", "int4")
FORMATS = ("nf4", "fp4", "int8", "int4")

_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)  # fmt: skip
# fp4 magnitudes by the low three bits: 0b000 zero, 0b001 the subnormal 0.0625, then 8, 12, 4, 6, 2, 3; bit 3 is the sign
_FP4_MAGNITUDE = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# the code each sorted fp4 value maps to; +0 (code 0) sorts before the second zero (code 8), as bitsandbytes orders them
_FP4_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


@functools.cache
def code_book(fmt: str) -> np.ndarray:
    """The 16 float32 values of a 4-bit format, indexed by code."""
    if fmt == "nf4":
        return np.asarray(_NF4, np.float32)
    if fmt == "fp4":
        values = np.asarray([m for m in _FP4_MAGNITUDE] + [-m if m else 0.0 for m in _FP4_MAGNITUDE], np.float32)
        return values / np.float32(12.0)
    if fmt == "int4":
        return np.arange(-8, 8, dtype=np.float32) / np.float32(7.0)
    raise ValueError(f"no 4-bit code book for format {fmt!r}")


@functools.cache
def bucket_bounds(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, codes)``: the float32 midpoints between sorted code-book values and the code of each bucket.

    A scaled value ``x`` falls in bucket ``k`` when ``bounds[k-1] < x <= bounds[k]`` (a tie goes down).
    """
    book = code_book(fmt)
    order = np.asarray(_FP4_SORTED_CODES) if fmt == "fp4" else np.argsort(book, kind="stable")
    if fmt == "int4":
        order = order[1:]  # -8 is never produced: symmetric codes -7..7
    values = book[order]
    return ((values[:-1] + values[1:]) / np.float32(2.0)).astype(np.float32), order.astype(np.uint8)


def _linspace_f32(start: float, stop: float, num: int) -> np.ndarray:
    # float32 end points and step, evaluated from both ends as torch.linspace does
    s, e = np.float32(start), np.float32(stop)
    step = np.float32((e - s) / np.float32(num - 1))
    i = np.arange(num, dtype=np.float64)
    return np.where(i < num // 2, s + step * i, e - step * (num - 1 - i)).astype(np.float32)


@functools.cache
def dynamic_map() -> np.ndarray:
    """The signed 8-bit dynamic code (Dettmers 2015): 256 sorted float32 values in [-1, 1].

    For exponent ``i`` in 0..6, ``2**i`` fraction levels (midpoints of a float32
    ``linspace(0.1, 1, 2**i + 1)``) scaled by ``10**(i - 6)``, with both signs; plus 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        bounds = _linspace_f32(0.1, 1.0, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        scaled = np.float32(10.0 ** (i - 6)) * means
        values += scaled.tolist() + (-scaled).tolist()
    return np.sort(np.asarray(values, np.float32))
