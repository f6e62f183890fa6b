"""The integrity of a checkpoint's JSON record: checksums of its canonical JSON, and short orbax errors.

The arrays of a checkpoint carry their own checksums (in the record); since
format version 3 the record itself (the spec, and per node its type, static
metadata such as ``scale``, ``layout``, ``kind``, ``dropout``, ``frozen``,
and its arrays' shapes, dtypes and checksums) is covered too: one SHA-256 of
the canonical JSON per part, stored under ``"checksums"``. An edited scale or
layout is refused on load instead of changing what the adapter computes.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import threading
import time
from typing import Any

from lora_jax.adapters._registry import SHARED
from lora_jax.errors._messages import expected


def _sha256(value: Any) -> str:
    """The SHA-256 of the canonical JSON of ``value`` (sorted keys, no spaces): the same after a JSON round trip."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def record_checksums(meta: dict[str, Any]) -> dict[str, str]:
    """Checksums of the JSON record: ``"spec"``, one per adapted path, ``"__shared__"``.

    Each node's record holds its type, its static metadata (``scale``,
    ``layout``, ``kind``, ``dropout``, ``frozen``) and its arrays' shapes,
    dtypes and checksums, so everything that changes what the adapter computes
    is covered: the arrays by their own checksums, the rest by these.
    """
    out = {"spec": _sha256(meta["spec"])}
    out.update({p: _sha256(e) for p, e in meta["adapters"].items()})
    if "shared" in meta:
        out[SHARED] = _sha256(meta["shared"])
    return out


def verify_record(where: str, meta: dict[str, Any], version: int) -> None:
    """Raise ``ValueError`` naming the first part of the record (spec, a node, the shared section) that was changed."""
    stored = meta.get("checksums")
    if not isinstance(stored, dict):
        raise ValueError(
            expected(
                where,
                f"a version {version} record with its 'checksums'",
                "none" if stored is None else stored,
                "the record was edited or truncated; restore an earlier checkpoint",
                found_is_text=stored is None,
            )
        )
    actual = record_checksums(meta)
    for part in sorted(set(actual) | set(stored)):
        if stored.get(part) != actual.get(part):
            name = "the spec" if part == "spec" else "the shared section" if part == SHARED else f"node {part!r}"
            raise ValueError(
                expected(
                    where,
                    f"the record of {name} to match its stored checksum {stored.get(part)}",
                    f"{actual.get(part) or 'no record'} (its metadata, e.g. scale, layout, kind, type or the spec, "
                    f"was edited or corrupted)",
                    "restore an earlier checkpoint, or re-save the adapter with save_adapter",
                    found_is_text=True,
                )
            )


def short_error(e: BaseException) -> str:
    """One short line for an orbax/tensorstore error (which carries a kB-long tensorstore spec).

    Example:
      >>> short_error(ValueError('DATA_LOSS: Error opening "zarr" driver: Error reading local file "/c/d/7f": '
      ...                         'bad [source locations=x] {"driver": "zarr"}'))
      'ValueError: DATA_LOSS reading /c/d/7f'
    """
    text = str(e)
    code = re.match(r"([A-Z_]{4,}):", text)
    files = re.findall(r'local file "([^"]+)"', text)
    if code or files:
        return f"{type(e).__name__}: {code.group(1) if code else 'error'}" + (f" reading {files[-1]}" if files else "")
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:200]}{'...' if len(first) > 200 else ''}"


def drain_failed_reads(*, quiet_s: float = 1.0, limit_s: float = 5.0) -> None:
    """Let the reads of a failed orbax restore finish, dropping their "Event loop is closed" callbacks.

    orbax runs a restore on a fresh event loop and closes it when the first
    read fails; tensorstore's other reads, still in flight, then try to call
    back into the closed loop, and each prints ``Exception ignored ...
    RuntimeError: Event loop is closed`` at some later moment (a test sees it
    as an unraisable-exception warning). Called on the error path only: until
    no such callback has come for ``quiet_s`` (at most ``limit_s``), exactly
    these callbacks are dropped; any other unraisable exception passes through
    to the previous hook, which is put back before returning.
    """
    previous = sys.unraisablehook
    last = [time.monotonic()]
    lock = threading.Lock()

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            with lock:
                last[0] = time.monotonic()
            return
        previous(unraisable)

    sys.unraisablehook = hook
    start = time.monotonic()
    try:
        while time.monotonic() - start < limit_s:
            with lock:
                quiet = time.monotonic() - last[0]
            if quiet >= quiet_s:
                break
            time.sleep(quiet_s - quiet)
    finally:
        sys.unraisablehook = previous
