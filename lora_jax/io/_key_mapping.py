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

Fused kernels (several torch weights stacked into one kernel by the loader, e.g. tunix's Gemma ``kv_einsum.w``
``(2, K, D, H)`` from ``k_proj`` and ``v_proj``): an entry whose jax key ends in ``[c]`` is component ``c`` of the
kernel (index ``c`` on its first axis), and a third transform element is a permute applied after the reshape::

    {r"model\\.layers\\.([0-9]+)\\.self_attn\\.k_proj\\.weight":
         (r"layers.\\1.attn.kv_einsum.w[0]", ((1, 0), (D, K, H), (1, 0, 2))), ...}

that is ``kernel[c] = transpose(reshape(transpose(weight, permute), reshape), post)``; :func:`fused_key_mapping`
writes such entries from the loader's own mapping. A fused kernel's components, all present, each go to their
own module: with the component axis stacked (layout ``"b..."``, one adapter per component) component ``c``'s A
and B; with it an output axis (``"o..."``, one adapter shared, qwix's) the shared A and B's slice ``c``; with it an
input axis (``"i..."``) A's slice ``c`` and the shared B.
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
      batch: the index on the adapter's stacked axes of this module's A and B (``(c,)`` for component ``c`` of a
        fused kernel whose component axis is stacked, layout ``"b..."``); ``()`` otherwise.
    """

    module: str
    key: str
    rows_in: bool
    in_order: np.ndarray
    out_order: np.ndarray
    gather: np.ndarray
    batch: tuple[int, ...] = ()

    def factors(self, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A ``(*in, r)`` and B ``(r, *out)`` as ``(in, r)`` and ``(r, out)`` in the torch weight's order.

        >>> t = HfTarget("m", "m.weight", False, np.array([1, 0]), np.array([0]), np.zeros((1, 2), int))
        >>> t.factors(np.array([[1.0], [2.0]]), np.array([[3.0]]))[0].ravel().tolist()
        [2.0, 1.0]
        """
        a, b = a[self.batch], b[self.batch]
        r = a.shape[-1]
        return a.reshape(-1, r)[self.in_order], b.reshape(r, -1)[:, self.out_order]

    def outputs(self, m: np.ndarray) -> np.ndarray:
        """A per-output-unit array over the kernel's output axes (DoRA's ``m``) in the torch order."""
        return m[self.batch].reshape(-1)[self.out_order]

    def weight(self, value: np.ndarray) -> np.ndarray:
        """A full kernel as the torch weight (for a leaf trained in full)."""
        return np.ascontiguousarray(value.reshape(-1)[self.gather])


def _check_mapping(key_mapping: Any, where: str = _WHERE) -> dict[str, tuple[str, Any]]:
    if callable(key_mapping) and not isinstance(key_mapping, Mapping):
        raise TypeError(
            expected(
                where,
                "the mapping dict itself",
                "a function (call it with the model's config first)",
                _HINT,
                found_is_text=True,
            )
        )
    if not isinstance(key_mapping, Mapping) or not key_mapping:
        raise TypeError(expected(where, "a non-empty dict {hf_key_regex: (jax_key, transform)}", key_mapping, _HINT))
    out = {}
    for hf, value in key_mapping.items():
        ok = isinstance(hf, str) and isinstance(value, Sequence) and len(value) == 2 and isinstance(value[0], str)
        if not ok:
            raise TypeError(expected(f"{where} at {hf!r}", "a value (jax_key, transform or None)", value, _HINT))
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


_COMPONENT = re.compile(r"(.*)\[([0-9]+)\]")


def _split_component(template: str) -> tuple[str, int | None]:
    """``"layers.\\1.kv.w[1]"`` -> ``("layers.\\1.kv.w", 1)``; a template without ``[c]`` -> ``(template, None)``."""
    m = _COMPONENT.fullmatch(template)
    return (template, None) if m is None else (m.group(1), int(m.group(2)))


def _hf_keys(path: str, mapping: dict[str, tuple[str, Any]]) -> list[tuple[str, Any, int | None, str]]:
    """``(hf key, transform, component, entry)`` of every entry for the kernel at ``path``, by component."""
    dotted = path.replace("/", ".")
    found = []
    for hf, (jax_key, transform) in mapping.items():
        template, component = _split_component(jax_key)
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
        found.append((key, transform, component, hf))
    if not found:
        templates = [_split_component(t)[0] for t, _ in mapping.values()]
        near = difflib.get_close_matches(dotted, templates, n=3, cutoff=0.0)
        raise ValueError(
            expected(
                f"{_WHERE} at {path}",
                f"an entry whose jax key matches {dotted!r} (nearest: {', '.join(near)})",
                "no entry",
                "the mapping is for another model family or version, or this kernel is fused from several "
                "torch tensors by the loader (not by the mapping): write the loader's fusing step into the mapping "
                "with lora_jax.fused_key_mapping, or pass name_map= for such kernels instead",
                found_is_text=True,
            )
        )
    components = [f[2] for f in found]
    if len(found) > 1 and None in components:
        raise ValueError(
            f"{path}: {_WHERE} has {len(found)} entries for this kernel ({', '.join(f[3] for f in found)}); keep one"
            f"{', or give each its component of the fused kernel ([0], [1], ...)' if set(components) != {None} else ''}."
        )
    twice = sorted({c for c in components if components.count(c) > 1})  # None is at most once here
    if twice:
        entries = ", ".join(f[3] for f in found if f[2] == twice[0])
        raise ValueError(f"{path}: {_WHERE} gives component [{twice[0]}] of this fused kernel twice ({entries}).")
    return sorted(found, key=lambda f: -1 if f[2] is None else f[2])


def _check_components(path: str, shape: tuple[int, ...], components: list[int]) -> None:
    """A fused kernel's entries name each index of its first axis once."""
    where = f"{_WHERE} at {path}"
    if len(shape) < 2:
        raise ValueError(f"{path}: {_WHERE} gives components ([c]) of this kernel, but it has shape {shape}.")
    n = shape[0]
    if sorted(components) != list(range(n)):
        missing = sorted(set(range(n)) - set(components))
        beyond = sorted(set(components) - set(range(n)))
        found = f"components {sorted(components)}" + (f" (missing {missing})" if missing else "")
        found += f" (beyond the axis: {beyond})" if beyond else ""
        raise ValueError(
            expected(
                where,
                f"one entry per component [0]..[{n - 1}] of the fused kernel's first axis (size {n}, kernel {shape})",
                found,
                "an adapter on a fused kernel changes every component, so each needs its torch module: add the "
                "missing entries (lora_jax.fused_key_mapping lists every source of the kernel)",
                found_is_text=True,
            )
        )


def _parts(transform: Any, where: str) -> tuple[tuple[int, ...], Any, Any]:
    """``(permute, reshape, permute after the reshape)`` of an entry's transform."""
    if transform is None:
        return (0, 1), None, None
    if not isinstance(transform, Sequence) or len(transform) not in (2, 3):
        raise ValueError(
            expected(
                where,
                "a transform (permute, reshape), or (permute, reshape, permute after the reshape) for a component "
                "of a fused kernel",
                transform,
                _HINT,
            )
        )
    permute, reshape, post = (*transform, None)[:3]
    return ((0, 1) if permute is None else tuple(permute)), reshape, post


def _grids(shape: tuple[int, ...], transform: Any, where: str, component: bool) -> list[np.ndarray]:
    """Candidate torch weights holding the flat (component) kernel index of each element.

    ``kernel = transpose(reshape(transpose(weight, permute), reshape), post)``: a 2-D torch weight reshaped to
    ``reshape`` may be any split of it into rows and columns, hence several candidates.
    """
    what = "the kernel component's" if component else "the kernel's"
    permute, reshape, post = _parts(transform, where)
    if sorted(permute) != [0, 1]:
        raise ValueError(
            expected(
                where,
                "a transform of a 2-D torch weight (nn.Linear, nn.Embedding): permute (0, 1) or (1, 0)",
                f"permute {permute}",
                "LoRA exports to PEFT's Linear and Embedding layers",
                found_is_text=True,
            )
        )
    after = tuple(range(len(shape))) if post is None else tuple(post)
    if sorted(after) != list(range(len(shape))):
        raise ValueError(
            expected(
                where,
                f"a permute after the reshape: of the {len(shape)} axes of {what} shape {shape}",
                f"{post!r}",
                "the third transform element is the loader's transpose of the reshaped weight",
                found_is_text=True,
            )
        )
    undo = tuple(int(k) for k in np.argsort(after))
    pre = tuple(shape[k] for k in undo)  # the reshape's result, before the permute after it
    if reshape is not None and tuple(reshape) != pre:
        said = f"{what} shape {shape}" if post is None else f"{what} shape {shape} once permuted by {after}"
        raise ValueError(
            expected(
                where,
                f"a transform whose reshape gives {said}",
                f"reshape {tuple(reshape)}",
                "the mapping was made for another model config (call it with this model's config)",
                found_is_text=True,
            )
        )
    index = np.arange(int(np.prod(shape))).reshape(shape).transpose(undo)
    if reshape is None:
        if index.ndim != 2:
            raise ValueError(f"{where}: the transform gives no reshape, but {what} shape {shape} is not 2-D.")
        splits = [index.shape]
    else:
        splits = [(int(np.prod(pre[:k])), int(np.prod(pre[k:]))) for k in range(1, len(pre))]
    inverse = tuple(int(k) for k in np.argsort(permute))
    return [index.reshape(two_d).transpose(inverse) for two_d in splits]


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


def _target(
    path: str, entry: tuple[str, Any, int | None, str], shape: tuple[int, ...], layout: str, kind: Any
) -> HfTarget:
    """The :class:`HfTarget` of one entry (one torch weight) of the kernel at ``path``."""
    key, transform, component, hf = entry
    where = f"{_WHERE} at {path}" if component is None else f"{_WHERE} at {path}[{component}] ({hf!r})"
    if not key.endswith(".weight"):
        raise ValueError(f"{where}: the entry maps this kernel to {key!r}, not a torch module's '.weight'.")
    module = key[: -len(".weight")]
    if len(shape) == 1 and kind is None:  # a norm's scale trained in full: the same vector
        if transform is not None:
            raise ValueError(f"{path}: {_WHERE} gives a transform {transform!r} for a 1-D parameter.")
        n = np.arange(shape[0])
        return HfTarget(module, key, False, n[:0], n, n)
    if component is not None and len(shape) < 2:
        raise ValueError(f"{where}: a component of a fused kernel of shape {shape}; a fused kernel has 2 axes or more.")
    part = shape if component is None else shape[1:]
    offset = 0 if component is None else component * int(np.prod(part))
    ins, outs = list(_layout.axes_of(layout, "i")), list(_layout.axes_of(layout, "o"))
    found = None
    for grid in _grids(part, transform, where, component is not None):
        grid = grid + offset  # the flat index on the whole (fused) kernel
        sep = _separate(grid, shape, ins, outs)
        if sep is not None:
            found = (grid, *sep)
            break
    if found is None:
        hint = "check the kernel's layout (LoraSpec(axes=...)) against the mapping"
        if component is not None:
            hint += " and the entry's permute after the reshape (the loader's transpose of this component)"
        raise ValueError(
            expected(
                where,
                f"a transform that keeps the kernel's input axes ({layout!r}: {[shape[k] for k in ins]}) on one "
                f"side of the torch weight and its output axes on the other",
                f"{transform!r}, which mixes them",
                hint,
                found_is_text=True,
            )
        )
    grid, rows_in, in_order, out_order = found
    want_rows_in = kind == "embed"
    if kind is not None and rows_in != want_rows_in:
        torch_side = "(in, out)" if rows_in else "(out, in)"
        raise ValueError(
            expected(
                where,
                "an nn.Embedding weight (vocab, d)" if want_rows_in else "an nn.Linear weight (out, in)",
                f"a transform that makes the torch weight {torch_side}",
                "PEFT's Linear and Embedding layers read the weight that way round",
                found_is_text=True,
            )
        )
    batch = (component,) if component is not None and layout[0] == "b" else ()
    return HfTarget(module, key, rows_in, in_order, out_order, grid, batch)


def resolve(
    key_mapping: Any, kernels: Mapping[str, tuple[tuple[int, ...], str, str]]
) -> dict[str, tuple[HfTarget, ...]]:
    """Every adapted kernel's :class:`HfTarget` (one per torch weight) under a tunix-style key mapping.

    Args:
      key_mapping: ``{hf_key_regex: (jax_key_template, transform)}``; ``transform`` is None or
        ``(permute, reshape)`` with ``kernel = reshape(transpose(weight, permute), reshape)``. A jax key ending
        in ``[c]`` is component ``c`` of a fused kernel (its first axis), and its transform may hold a third
        element, a permute applied after the reshape.
      kernels: ``{path: (kernel shape, layout, kind)}`` of the adapted kernels (kind ``"embed"`` for an
        embedding table, whose torch weight is ``(vocab, d)``; None for a leaf trained in full, whose torch
        weight may be either way round, or 1-D with no transform).

    Returns:
      ``{path: (HfTarget, ...)}``: one target, or a fused kernel's one per component in component order.

    Raises:
      TypeError: ``key_mapping`` is not such a dict.
      ValueError: a kernel matches no entry or several, its torch key is not a module's ``.weight``, the
        transform is for another shape or mixes input and output axes, or a fused kernel's components do not
        cover its first axis; the message names the path.

    Example:
      >>> mapping = {r"model\\.layers\\.([0-9]+)\\.o_proj\\.weight": (r"layers.\\1.o.w", ((1, 0), (2, 3, 4)))}
      >>> (t,) = resolve(mapping, {"layers/0/o/w": ((2, 3, 4), "iio", "linear")})["layers/0/o/w"]
      >>> t.module, t.rows_in, t.in_order.tolist()
      ('model.layers.0.o_proj', False, [0, 1, 2, 3, 4, 5])

      A fused kernel ``(2, 4, 3)`` made from two ``nn.Linear(4, 3)`` weights, ``stack([w0.T, w1.T])``:

      >>> fused = {r"k\\.weight": (r"kv.w[0]", ((1, 0), None)), r"v\\.weight": (r"kv.w[1]", ((1, 0), None))}
      >>> [(t.module, t.batch) for t in resolve(fused, {"kv/w": ((2, 4, 3), "bio", "linear")})["kv/w"]]
      [('k', (0,)), ('v', (1,))]
    """
    mapping = _check_mapping(key_mapping)
    out = {}
    for path, (shape, layout, kind) in kernels.items():
        shape = tuple(int(n) for n in shape)
        stacked = _layout.axes_of(layout, "b")
        if stacked and stacked != (0,):
            raise _stacked(path, layout)
        entries = _hf_keys(path, mapping)
        fused = entries[0][2] is not None
        if stacked and not fused:
            raise _stacked(path, layout)
        if fused:
            _check_components(path, shape, [e[2] for e in entries])
        out[path] = tuple(_target(path, e, shape, layout, kind) for e in entries)
    return out


def _stacked(path: str, layout: str) -> ValueError:
    return ValueError(
        expected(
            f"{_WHERE} at {path}",
            "a kernel of one layer (a key mapping names one torch module per kernel), or a fused kernel whose "
            "stacked axis is its first, the component axis",
            f"layout {layout!r} with stacked axes",
            "export a stacked (nn.scan) kernel with name_map= and a {i} template instead",
            found_is_text=True,
        )
    )
