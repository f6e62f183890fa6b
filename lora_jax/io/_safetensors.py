"""Reading PEFT's ``adapter_model.safetensors``: every floating dtype PEFT writes, and nothing else.

``safetensors.numpy.load`` knows no ``BF16`` (the dtype most PEFT adapters
are saved in) and fails with a bare ``KeyError`` on it and on ``F8_*``. The
format is small (an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets"}}``, then the bytes), so it is read
here with NumPy and ``ml_dtypes`` (a JAX dependency), and checked on the way:
a truncated file, a tensor outside the data, a dtype that is not a LoRA
weight's (integers, bool, float8), or a NaN/inf value each raise, naming the
file and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import ml_dtypes
import numpy as np

from lora_jax.errors._messages import expected

FLOATS = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_OTHER = {"I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "C64", "F8_E4M3", "F8_E5M2"}
_WHAT = "a floating tensor (F16, BF16, F32 or F64), as PEFT saves LoRA weights"


def _corrupt(file: Any, why: str) -> ValueError:
    return ValueError(f"{file}: cannot read the tensors, the file is corrupt or truncated ({why}).")


def read_tensors(data: bytes, file: Any) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file's bytes, each finite and of a floating dtype.

    Example:
      >>> from safetensors.numpy import save
      >>> read_tensors(save({"w": np.ones((2, 3), np.float32)}), "f")["w"].shape
      (2, 3)
      >>> read_tensors(save({"w": np.array([1.0, np.nan], np.float32)}), "f")
      Traceback (most recent call last):
      ValueError: f: tensor 'w': expected finite values, found 1 NaN/inf of 2. ...
    """
    if len(data) < 8:
        raise _corrupt(file, f"{len(data)} bytes, fewer than the 8-byte header length")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise _corrupt(file, f"the header says {n} bytes of JSON, the file has {len(data) - 8} after the length")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(file, f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "the header is not a JSON object")
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise _corrupt(file, f"the header entry of {name!r} is malformed: {info!r}") from None
        if code not in FLOATS:
            known = code in _OTHER
            hint = (
                "cast the adapter to bfloat16 or float32 before saving it (float8 LoRA weights are not read)"
                if str(code).startswith("F8")
                else "a LoRA weight is floating point; this file was not written as a LoRA adapter"
                if known
                else "the file is corrupt or written by an unknown tool"
            )
            raise ValueError(expected(f"{file}: tensor {name!r}", _WHAT, f"dtype {code}", hint, found_is_text=True))
        dtype = np.dtype(FLOATS[code])
        if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * dtype.itemsize:
            raise _corrupt(file, f"tensor {name!r} {code}{list(shape)} at bytes [{start}, {end}) of {len(body)}")
        value = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        bad = int(np.count_nonzero(~np.isfinite(value.astype(np.float64))))
        if bad:
            raise ValueError(
                expected(
                    f"{file}: tensor {name!r}",
                    "finite values",
                    f"{bad} NaN/inf of {value.size}",
                    "the adapter diverged in training or the file is damaged; export an earlier checkpoint",
                    found_is_text=True,
                )
            )
        out[name] = value
    return out
