"""PEFT names and layouts from a model family's own Hugging Face key mapping (tunix's ``params`` modules).

The JAX stack's model families ship the map from Hugging Face checkpoint keys to their parameter paths, with the
reshape and transpose that turns each torch tensor into the JAX kernel, e.g. tunix's
``tunix.models.llama3.params._get_key_and_transform_mapping(cfg)``::

    {r"model\\.layers\\.([0-9]+)\\.self_attn\\.q_proj\\.weight":
         (r"layers.\\1.attn.q_proj.w", ((1, 0), (embed_dim, num_heads, head_dim))), ...}

that is ``kernel = reshape(transpose(weight, permute), reshape)``. :func:`resolve` reads such a mapping backwards
for every adapted kernel: which Hugging Face module it is (``model.layers.0.self_attn.q_proj``), and which element
of the 2-D torch weight each element of the kernel is. From that, the adapter's A and B become PEFT's ``lora_A``
``(r, in)`` and ``lora_B`` ``(out, r)`` in torch's element order (:class:`HfTarget`), for any permute/reshape that
keeps the kernel's input axes on the weight's input side and its output axes on the output side; one that mixes
them cannot carry a low-rank update and raises.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lora_jax.errors._messages import expected
from lora_jax.targets import _layout

_WHERE = "export_peft(key_mapping=...)"
_HINT = (
    "pass the dict the model family's mapping function returns, e.g. "
    "tunix.models.llama3.params._get_key_and_transform_mapping(config)"
)


@dataclasses.dataclass(frozen=True)
class HfTarget:
    """Where one adapted kernel lives in the Hugging Face model, and how its elements map to the torch weight.

    Attributes:
      module: the torch module name (``"model.layers.0.self_attn.q_proj"``).
      key: the checkpoint key the mapping matched (``module + ".weight"``).
      rows_in: the torch weight's rows run over the kernel's input axes (an embedding table ``(vocab, d)``, or a
        ``Conv1D`` ``(in, out)``); else its rows are the output axes (``nn.Linear``'s ``(out, in)``).
      in_order: for each input position of the torch weight, the flat index over the kernel's input axes (C
        order, in the kernel's axis order): A's row for it.
      out_order: the same for the output positions and the kernel's output axes: B's column for it.
      gather: the flat kernel index of every element of the torch weight (its shape), for leaves trained in full.
    """

    module: str
    key: str
    rows_in: bool
    in_order: np.ndarray
    out_order: np.ndarray
    gather: np.ndarray

    def factors(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A ``(*in, r)`` and B ``(r, *out)`` as ``(in, r)`` and ``(r, out)`` in the torch weight's order.

        >>> t = HfTarget("m", "m.weight", False, np.array([1, 0]), np.array([0]), np.zeros((1, 2), int))
        >>> t.factors(np.array([[1.0], [2.0]]), np.array([[3.0]]))[0].ravel().tolist()
        [2.0, 1.0]
        """
        r = a.shape[-1]
        return a.reshape(-1, r)[self.in_order], b.reshape(r, -1)[:, self.out_order]

    def outputs(self, m: np.ndarray) -> np.ndarray:
        """A per-output-unit array over the kernel's output axes (DoRA's ``m``) in the torch order."""
        return m.reshape(-1)[self.out_order]

    def weight(self, value: np.ndarray) -> np.ndarray:
        """A full kernel as the torch weight (for a leaf trained in full)."""
        return np.ascontiguousarray(value.reshape(-1)[self.gather])


def _check_mapping(key_mapping: Any) -> dict[str, tuple[str, Any]]:
    if callable(key_mapping) and not isinstance(key_mapping, Mapping):
        raise TypeError(
            expected(
                _WHERE,
                "the mapping dict itself",
                "a function (call it with the model's config first)",
                _HINT,
                found_is_text=True,
            )
        )
    if not isinstance(key_mapping, Mapping) or not key_mapping:
        raise TypeError(expected(_WHERE, "a non-empty dict {hf_key_regex: (jax_key, transform)}", key_mapping, _HINT))
    out = {}
    for hf, value in key_mapping.items():
        ok = isinstance(hf, str) and isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str)
        if not ok:
            raise TypeError(expected(f"{_WHERE} at {hf!r}", "a value (jax_key, transform or None)", value, _HINT))
        out[hf] = (value[0], value[1])
    return out


def _template_regex(template: str) -> re.Pattern:
    """The jax key template (``layers.\\1.attn.q_proj.w``) as a regex whose groups capture ``\\1``, ``\\2``..."""
    parts, seen = [], set()
    for i, piece in enumerate(re.split(r"\\(\d+)", template)):
        if i % 2 == 0:
            parts.append(re.escape(piece))
        elif piece in seen:
            parts.append(f"(?P=g{piece})")
        else:
            seen.add(piece)
            parts.append(f"(?P<g{piece}>.+?)")
    return re.compile("".join(parts))


class _CannotFill(ValueError):
    pass


def _fill(pattern: str, groups: dict[int, str]) -> str:
    """The one string ``pattern`` matches with its capture groups set to ``groups``.

    Handles what key mappings use: escaped literals, capture groups (set from ``groups``), and optional
    non-capturing groups ``(?:...)?`` (left out); anything else raises :class:`_CannotFill`.

    >>> _fill(r"(?:lm\\.)?model\\.layers\\.([0-9]+)\\.q\\.weight", {1: "3"})
    'model.layers.3.q.weight'
    """
    out, i, group = [], 0, 0

    def closing(start: int) -> int:
        depth, j = 0, start
        while j < len(pattern):
            c = pattern[j]
            if c == "\\":
                j += 2
                continue
            depth += c == "("
            depth -= c == ")"
            if depth == 0:
                return j
            j += 1
        raise _CannotFill(f"unbalanced parentheses in {pattern!r}")

    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if not nxt or nxt.isalnum():
                raise _CannotFill(f"the escape \\{nxt} in {pattern!r} stands for more than one string")
            out.append(nxt)
            i += 2
        elif c == "(":
            end = closing(i)
            if pattern.startswith("(?:", i):
                if pattern[end + 1 : end + 2] == "?":  # optional: left out
                    i = end + 2
                    continue
                inner = pattern[i + 3 : end]
                group += inner.count("(") - inner.count("(?")
                out.append(_fill(inner, {}))
            elif pattern.startswith("(?", i):
                raise _CannotFill(f"the group {pattern[i : end + 1]!r} in {pattern!r}")
            else:
                group += 1
                if group not in groups:
                    raise _CannotFill(f"capture group {group} of {pattern!r} is not used by the jax key")
                out.append(groups[group])
                group += pattern[i + 1 : end].count("(") - pattern[i + 1 : end].count("(?")
            i = end + 1
        elif c in ".*+?[]{}|^$":
            raise _CannotFill(f"{c!r} at position {i} of {pattern!r} stands for more than one string")
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _hf_key(path: str, mapping: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """The Hugging Face key of the kernel at ``path`` and the mapping's transform for it."""
    dotted = path.replace("/", ".")
    found = []
    for hf, (template, transform) in mapping.items():
        m = _template_regex(template).fullmatch(dotted)
        if m is None:
            continue
        groups = {int(k[1:]): v for k, v in m.groupdict().items()}
        try:
            key = _fill(hf, groups)
        except _CannotFill as e:
            raise ValueError(
                expected(
                    f"{_WHERE} at {path}",
                    "a Hugging Face key regex that names one key once its groups are set",
                    f"{hf!r}: {e}",
                    "add an entry for this kernel whose regex is a plain key with capture groups",
                    found_is_text=True,
                )
            ) from None
        if re.fullmatch(hf, key) is None or re.sub(hf, template, key) != dotted:
            raise ValueError(f"{path}: {_WHERE} entry {hf!r} does not map {key!r} back to {dotted!r}.")
        found.append((key, transform, hf))
    if not found:
        templates = [t for t, _ in mapping.values()]
        near = difflib.get_close_matches(dotted, templates, n=3, cutoff=0.0)
        raise ValueError(
            expected(
                f"{_WHERE} at {path}",
                f"an entry whose jax key matches {dotted!r} (nearest: {', '.join(near)})",
                "no entry",
                "the mapping is for another model family or version, or this kernel is fused from several "
                "torch tensors by the loader (not by the mapping); pass name_map= for such kernels instead",
                found_is_text=True,
            )
        )
    if len(found) > 1:
        raise ValueError(
            f"{path}: {_WHERE} has {len(found)} entries for this kernel ({', '.join(f[2] for f in found)}); keep one."
        )
    return found[0][0], found[0][1]


def _transposed_shapes(shape: tuple[int, ...], transform: Any, path: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """``(permute, candidate 2-D shapes of transpose(weight, permute))`` for ``kernel = reshape(...)``."""
    permute, reshape = (None, None) if transform is None else transform
    permute = (0, 1) if permute is None else tuple(permute)
    if sorted(permute) != [0, 1]:
        raise ValueError(
            expected(
                f"{_WHERE} at {path}",
                "a transform of a 2-D torch weight (nn.Linear, nn.Embedding): permute (0, 1) or (1, 0)",
                f"permute {permute}",
                "LoRA exports to PEFT's Linear and Embedding layers",
                found_is_text=True,
            )
        )
    if reshape is not None and tuple(reshape) != tuple(shape):
        raise ValueError(
            expected(
                f"{_WHERE} at {path}",
                f"a transform whose reshape gives the kernel's shape {tuple(shape)}",
                f"reshape {tuple(reshape)}",
                "the mapping was made for another model config (call it with this model's config)",
                found_is_text=True,
            )
        )
    if reshape is None:
        if len(shape) != 2:
            raise ValueError(f"{path}: {_WHERE} gives no reshape, but the kernel has shape {shape}, not 2-D.")
        return permute, [tuple(shape)]
    return permute, [(int(np.prod(shape[:k])), int(np.prod(shape[k:]))) for k in range(1, len(shape))]


def _separate(grid: np.ndarray, shape: tuple[int, ...], ins: list[int], outs: list[int]) -> Any:
    """``(rows_in, in_order, out_order)`` if every row of the weight ``grid`` holds one in- or out-position."""
    idx = np.unravel_index(grid, shape)

    def flat(axes: list[int], sel: Any) -> np.ndarray:
        return np.ravel_multi_index(tuple(idx[k][sel] for k in axes), tuple(shape[k] for k in axes))

    for rows_in, row_axes, col_axes in ((False, outs, ins), (True, ins, outs)):
        rows, cols = flat(row_axes, (slice(None), slice(None))), flat(col_axes, (slice(None), slice(None)))
        if (rows == rows[:, :1]).all() and (cols == cols[:1, :]).all():
            row_order, col_order = rows[:, 0], cols[0, :]
            return (True, row_order, col_order) if rows_in else (False, col_order, row_order)
    return None


def resolve(key_mapping: Any, kernels: Mapping[str, tuple[tuple[int, ...], str, str]]) -> dict[str, HfTarget]:
    """Every adapted kernel's :class:`HfTarget` under a tunix-style key mapping.

    Args:
      key_mapping: ``{hf_key_regex: (jax_key_template, transform)}``; ``transform`` is None or
        ``(permute, reshape)`` with ``kernel = reshape(transpose(weight, permute), reshape)``.
      kernels: ``{path: (kernel shape, layout, kind)}`` of the adapted kernels (kind ``"embed"`` for an
        embedding table, whose torch weight is ``(vocab, d)``; None for a leaf trained in full, whose torch
        weight may be either way round, or 1-D with no transform).

    Returns:
      ``{path: HfTarget}``.

    Raises:
      TypeError: ``key_mapping`` is not such a dict.
      ValueError: a kernel matches no entry or several, its torch key is not a module's ``.weight``, the
        transform is for another shape, or it mixes input and output axes; the message names the path.

    Example:
      >>> mapping = {r"model\\.layers\\.([0-9]+)\\.o_proj\\.weight": (r"layers.\\1.o.w", ((1, 0), (2, 3, 4)))}
      >>> t = resolve(mapping, {"layers/0/o/w": ((2, 3, 4), "iio", "linear")})["layers/0/o/w"]
      >>> t.module, t.rows_in, t.in_order.tolist()
      ('model.layers.0.o_proj', False, [0, 1, 2, 3, 4, 5])
    """
    mapping = _check_mapping(key_mapping)
    out = {}
    for path, (shape, layout, kind) in kernels.items():
        shape = tuple(int(n) for n in shape)
        if "b" in layout:
            raise ValueError(
                expected(
                    f"{_WHERE} at {path}",
                    "a kernel of one layer (a key mapping names one torch module per kernel)",
                    f"layout {layout!r} with stacked axes",
                    "export a stacked (nn.scan) kernel with name_map= and a {i} template instead",
                    found_is_text=True,
                )
            )
        key, transform = _hf_key(path, mapping)
        if not key.endswith(".weight"):
            raise ValueError(f"{path}: {_WHERE} maps this kernel to {key!r}, not a torch module's '.weight'.")
        if len(shape) == 1 and kind is None:  # a norm's scale trained in full: the same vector
            if transform is not None:
                raise ValueError(f"{path}: {_WHERE} gives a transform {transform!r} for a 1-D parameter.")
            n = np.arange(shape[0])
            out[path] = HfTarget(key[: -len(".weight")], key, False, n[:0], n, n)
            continue
        permute, candidates = _transposed_shapes(shape, transform, path)
        ins, outs = list(_layout.axes_of(layout, "i")), list(_layout.axes_of(layout, "o"))
        inverse = tuple(int(k) for k in np.argsort(permute))
        found = None
        for two_d in candidates:
            grid = np.arange(int(np.prod(shape))).reshape(two_d).transpose(inverse)
            sep = _separate(grid, shape, ins, outs)
            if sep is not None:
                found = (grid, *sep)
                break
        if found is None:
            raise ValueError(
                expected(
                    f"{_WHERE} at {path}",
                    f"a transform that keeps the kernel's input axes ({layout!r}: {[shape[k] for k in ins]}) on one "
                    f"side of the torch weight and its output axes on the other",
                    f"{transform!r}, which mixes them",
                    "check the kernel's layout (LoraSpec(axes=...)) against the mapping",
                    found_is_text=True,
                )
            )
        grid, rows_in, in_order, out_order = found
        want_rows_in = kind == "embed"
        if kind is not None and rows_in != want_rows_in:
            torch_side = "(in, out)" if rows_in else "(out, in)"
            raise ValueError(
                expected(
                    f"{_WHERE} at {path}",
                    "an nn.Embedding weight (vocab, d)" if want_rows_in else "an nn.Linear weight (out, in)",
                    f"a transform that makes the torch weight {torch_side}",
                    "PEFT's Linear and Embedding layers read the weight that way round",
                    found_is_text=True,
                )
            )
        out[path] = HfTarget(key[: -len(".weight")], key, rows_in, in_order, out_order, grid)
    return out
