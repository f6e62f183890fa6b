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


def _is_closed_loop_callback(unraisable: Any) -> bool:
    """Whether an unraisable exception is a callback into a closed asyncio loop (``call_soon_threadsafe``)."""
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    tb = unraisable.exc_traceback
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def drop_closed_loop_callbacks() -> None:
    """Before an orbax restore: drop, from now on, the "Event loop is closed" callbacks a failed read leaves.

    orbax runs a restore on a fresh event loop and closes it when a read
    fails; tensorstore's other reads, still in flight, call back into the
    closed loop when they finish, at moments nothing controls (before the
    error reaches the caller, or seconds later on a loaded machine), and each
    would print ``Exception ignored ... RuntimeError: Event loop is closed`` (a
    test sees it as an unraisable-exception warning). This wraps
    ``sys.unraisablehook`` once per process (it is idempotent): exactly these
    callbacks (a ``RuntimeError("Event loop is closed")`` raised in
    ``call_soon_threadsafe``), which no one can act on, are dropped whenever
    they come; every other unraisable exception goes to the hook that was
    installed before.

    Example:
      >>> import sys
      >>> drop_closed_loop_callbacks(); hook = sys.unraisablehook
      >>> drop_closed_loop_callbacks(); sys.unraisablehook is hook  # installed once
      True
    """
    if getattr(sys.unraisablehook, _MARK, False):
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_callback(unraisable):
            previous(unraisable)

    setattr(hook, _MARK, True)
    sys.unraisablehook = hook


_MARK = "_lora_jax_drops_closed_loop_callbacks"
