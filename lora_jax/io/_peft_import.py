"""Reading Hugging Face PEFT LoRA adapters: ``import_peft``.

The inverse of :func:`lora_jax.export_peft` (layouts documented in
:mod:`lora_jax.io._peft_export`). With ``params=None`` the kernels are taken from the
file itself: every LoRA module becomes a 2-D ``"io"`` kernel at path
``module/name/kernel`` (``embedding`` for ``lora_embedding_*``, a 4-D
``"iiio"`` Conv2D kernel when ``lora_A`` is 4-D), which is what
``python -m lora_jax convert`` uses.
"""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters._dora import DoraWeights
from lora_jax.adapters._nodes import LoraWeights, Trainable
from lora_jax.errors._messages import expected
from lora_jax.io._files import as_path
from lora_jax.io._peft_adalora import import_adalora, is_adalora
from lora_jax.io._peft_names import (
    CONFIG,
    EMBED_A,
    EMBED_B,
    LORA_A,
    LORA_B,
    LORA_PARTS,
    MAGNITUDE,
    NameMap,
    expand,
    module_name,
    pattern_key,
)
from lora_jax.io._peft_read import config_values, read_peft
from lora_jax.io._peft_vera import import_vera, is_vera
from lora_jax.spec._spec import LoraSpec, lora_scale
from lora_jax.targets import _layout
from lora_jax.targets._paths import flatten_with_paths, nest
from lora_jax.targets._select import _first

_KERNEL_KEYS = ("kernel", "embedding", "weight")


def _split_keys(tensors: dict[str, np.ndarray], saved: list[str]) -> tuple[dict, dict, list[str]]:
    lora: dict[str, dict[str, np.ndarray]] = {}
    full: dict[str, dict[str, np.ndarray]] = {}
    unknown = []
    for k, v in tensors.items():
        part = next((p for p in LORA_PARTS if k.endswith("." + p)), None)
        if part is not None:
            lora.setdefault(k[: -len(part) - 1], {})[part] = v
            continue
        module, _, param = k.rpartition(".")
        if module in saved or any(module.endswith("." + m) for m in saved):
            full.setdefault(module, {})[param] = v
        else:
            unknown.append(k)
    return lora, full, unknown


def _from_peft(name: str, parts: dict[str, np.ndarray], shape: tuple, layout: str, p: str) -> tuple:
    """(A ``(*in, r)``, B ``(r, *out)``, kind, DoRA's m ``(*out)`` or None) of one module, checked against ``shape``."""
    embed = EMBED_A in parts or EMBED_B in parts
    ka, kb = (EMBED_A, EMBED_B) if embed else (LORA_A, LORA_B)
    if set(parts) - {MAGNITUDE} != {ka, kb}:
        raise ValueError(f"{p}: PEFT module {name!r} has tensors {sorted(parts)}; expected {ka} and {kb}.")
    la, lb = parts[ka], parts[kb]
    r = la.shape[0]
    ins, outs = _layout.dims_of(layout, shape, "i"), _layout.dims_of(layout, shape, "o")
    if la.ndim > 2:  # conv: (r, in, *spatial) -> (*spatial, in, r)
        a = la.transpose(*range(2, la.ndim), 1, 0)
        b = lb.reshape(lb.shape[0], r).T.reshape(r, *outs)
    else:
        a = la.T.reshape(*ins, r) if la.size == r * math.prod(ins) else None
        b = lb.T.reshape(r, *outs) if lb.ndim == 2 and lb.size == r * math.prod(outs) else None
    if a is None or b is None or a.shape != (*ins, r) or b.shape != (r, *outs):
        raise ValueError(
            f"{p}: PEFT module {name!r} has {ka} {la.shape} and {kb} {lb.shape}, which do not fit the kernel "
            f"{shape} with layout {layout!r} (fan-in {math.prod(ins)}, fan-out {math.prod(outs)}). The adapter "
            f"was made for another model, or name_map points this path at the wrong module."
        )
    mag = parts.get(MAGNITUDE)
    if mag is not None:  # DoRA's m: (out,), or (1, out, 1, ...) for a conv
        if mag.size != math.prod(outs):
            raise ValueError(
                expected(
                    f"{p}: PEFT module {name!r} {MAGNITUDE}",
                    f"{math.prod(outs)} values (one per output unit of the kernel {shape})",
                    f"shape {tuple(mag.shape)}",
                    "The adapter was made for another model, or name_map points this path at the wrong module",
                    found_is_text=True,
                )
            )
        mag = mag.reshape(outs)
    return a, b, "embed" if embed else "linear", mag


def _name_or_none(name_map: NameMap, path: str) -> str | None:
    """The module name of ``path``, or None when ``name_map`` leaves it out (a dict without it)."""
    if name_map is None and "/" not in path:
        return None
    if isinstance(name_map, Mapping) and path not in name_map and path.rpartition("/")[0] not in name_map:
        return None
    return module_name(name_map, path)


def _exact(path: str) -> str:
    return "^" + re.escape(path) + "$"


def _full_value(p: str, leaf_shape: tuple, value: np.ndarray, axes: Any) -> np.ndarray:
    key = p.rpartition("/")[2]
    if key == "kernel":
        layout = _first(axes, p, "io" if len(leaf_shape) == 2 else None)
        if value.ndim == 4 and len(leaf_shape) == 4:  # conv weight (out, in, kh, kw)
            return value.transpose(2, 3, 1, 0)
        if layout is not None:
            ins, outs = _layout.axes_of(layout, "i"), _layout.axes_of(layout, "o")
            dims = [leaf_shape[k] for k in (*ins, *outs)]
            return value.T.reshape(dims).transpose(np.argsort([*ins, *outs]))
        if len(leaf_shape) > 2:
            raise ValueError(
                f"{p}: a {len(leaf_shape)}-axis kernel of shape {tuple(leaf_shape)} is saved in full as PEFT's 2-D "
                f"{tuple(value.shape)} weight; which kernel axes are its inputs is ambiguous. Pass its layout, "
                f"e.g. import_peft(..., axes={{{p!r}: 'ioo'}})."
            )
    return value.reshape(leaf_shape)


def _skeleton(config: dict[str, Any], tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    """Abstract params implied by the file alone: 2-D "io" kernels, 4-D Conv2D kernels, saved modules."""
    lora_parts, full_parts, _ = _split_keys(tensors, list(config.get("modules_to_save") or []))
    flat: dict[str, Any] = {}
    for name, parts in lora_parts.items():
        base = name.replace(".", "/")
        la, lb = parts.get(LORA_A, parts.get(EMBED_A)), parts.get(LORA_B, parts.get(EMBED_B))
        if la is None or lb is None:
            raise ValueError(f"PEFT module {name!r} has tensors {sorted(parts)}; expected an A and a B weight.")
        if EMBED_A in parts:
            flat[f"{base}/embedding"] = jax.ShapeDtypeStruct((la.shape[1], lb.shape[0]), la.dtype)
        elif la.ndim == 4:
            flat[f"{base}/kernel"] = jax.ShapeDtypeStruct((*la.shape[2:], la.shape[1], lb.shape[0]), la.dtype)
        else:
            flat[f"{base}/kernel"] = jax.ShapeDtypeStruct((la.shape[1], lb.shape[0]), la.dtype)
    for name, params in full_parts.items():
        base = name.replace(".", "/")
        for key, v in params.items():
            if key == "bias":
                flat[f"{base}/bias"] = jax.ShapeDtypeStruct(v.shape, v.dtype)
            elif key == "weight" and v.ndim == 4:
                flat[f"{base}/kernel"] = jax.ShapeDtypeStruct((*v.shape[2:], v.shape[1], v.shape[0]), v.dtype)
            elif key == "weight" and v.ndim == 2:
                flat[f"{base}/kernel"] = jax.ShapeDtypeStruct(v.shape[::-1], v.dtype)
            elif key == "weight":
                flat[f"{base}/scale"] = jax.ShapeDtypeStruct(v.shape, v.dtype)
    return nest(flat)


def import_peft(
    path: str | os.PathLike,
    params: Any = None,
    *,
    name_map: NameMap = None,
    axes: Any = None,
    key_mapping: Any = None,
) -> tuple[dict[str, Any], LoraSpec]:
    """Read a PEFT LoRA adapter into ``(lora, spec)`` for these params.

    ``apply_lora(params, lora)`` reproduces PEFT's merged weights. Every tensor
    in the file must land on a parameter and every layer of a stacked kernel
    must be present: unknown or missing keys raise, listing them.

    VeRA and AdaLoRA adapters (``peft_type`` ``"VERA"`` / ``"ADALORA"``) are
    read into :class:`lora_jax.VeraWeights` / :class:`lora_jax.AdaLoraWeights`;
    an AdaLoRA adapter pruned by PEFT's allocator (a ``rank_pattern`` in its
    config) comes back at ``init_r`` with zeros at the pruned triplets (its
    mask and schedule: :func:`lora_jax.import_adalora_allocation`).

    Args:
      path: a PEFT adapter directory (``save_pretrained`` output), local or a
        URI (``"gs://bucket/peft"``).
      params: the base parameters (arrays or ``jax.ShapeDtypeStruct``), or
        None to take the kernels from the file alone (2-D ``"io"`` kernels at
        ``module/path/kernel``, see the module docstring); then ``name_map``
        and ``axes`` must be None.
      name_map: parameter path -> torch module name, as for
        :func:`export_peft`.
      axes: kernel layouts ``{pattern: layout}`` for kernels with more than
        two axes, as ``LoraSpec(axes=...)`` (2-D kernels are ``"io"``; a 4-D
        kernel whose ``lora_A`` is 4-D is a Conv2D ``"iiio"``).
      key_mapping: instead of ``name_map``, the model family's Hugging Face
        key mapping, as for :func:`export_peft`: each kernel's torch module
        comes from it and A, B (and DoRA's ``m``) are read back from the torch
        weight's element order (an adapter trained with PEFT on the Hugging
        Face model, for the JAX model the mapping loads it into).

    Returns:
      ``(lora, spec)``: the adapter tree and a :class:`LoraSpec` that selects
      exactly the imported paths with their ranks, alphas and layouts.

    Raises:
      FileNotFoundError / ValueError: on a missing or malformed adapter,
        unknown keys, missing layers, shapes that do not fit ``params``, or an
        adapter made for a modified base (``init_lora_weights`` ``"pissa"``,
        ``"olora"``, ``"corda"``, ``"loftq"``, ``"lora_ga"`` saved without
        PEFT's conversion).

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora, export_peft
      >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}}}
      >>> spec = LoraSpec(rank=2, alpha=4.0, targets=["q_proj"], init="random")
      >>> lora = init_lora(jax.random.key(0), params, spec)
      >>> back, spec2 = import_peft(export_peft(os.path.join(tempfile.mkdtemp(), "p"), lora, spec), params)
      >>> bool(jnp.all(back["model"]["q_proj"]["kernel"].b == lora["model"]["q_proj"]["kernel"].b)), spec2.rank
      (True, 2)
    """
    path = as_path(path, "import_peft(path=...)")
    if is_adalora(path):  # AdaLoRA: its own format (lora_jax.io._peft_adalora); 2-D kernels only
        if axes is not None:
            raise ValueError(f"{path}: import_peft(axes=...) with an AdaLoRA adapter: PEFT's AdaLoRA adapts 2-D "
                             f"nn.Linear kernels only, leave axes out.")  # fmt: skip
        return import_adalora(path, params, name_map=name_map)
    if is_vera(path):  # VeRA: its own format (lora_jax.io._peft_vera)
        return import_vera(path, params, name_map=name_map)
    config, tensors = read_peft(path)
    if key_mapping is not None and (name_map is not None or params is None):
        raise ValueError(
            "import_peft(key_mapping=...) gives every module's name from the mapping: pass params (the JAX "
            "model's, which the mapping loads into) and no name_map."
        )
    if params is None:
        if name_map is not None or axes is not None:
            raise ValueError("import_peft(params=None) reads the kernels from the file; name_map and axes need params.")
        params = _skeleton(config, tensors)
    try:
        axes = LoraSpec(axes=axes or ()).axes
    except (TypeError, ValueError) as e:
        raise type(e)(
            expected(
                "import_peft(axes=...)",
                "kernel layouts {pattern: layout}, e.g. {'attn/query': 'ioo'}",
                axes,
                " ".join(str(e).split()),
            )
        ) from None
    saved = list(config.get("modules_to_save") or [])
    lora_parts, full_parts, unknown = _split_keys(tensors, saved)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} tensor(s) are neither LoRA weights nor modules_to_save: "
            f"{', '.join(unknown[:6])}. lora_jax imports LoRA and DoRA adapters (no LoRA biases)."
        )
    values = config_values(path / CONFIG, config)
    use_dora = bool(config.get("use_dora"))
    r0, alpha0, rslora, dropout = values["r"], values["lora_alpha"], values["use_rslora"], values["lora_dropout"]
    rank_pattern, alpha_pattern = values["rank_pattern"], values["alpha_pattern"]
    flat = {p: x for p, x in flatten_with_paths(params).items() if hasattr(x, "shape")}
    if not flat:
        raise TypeError(
            expected(
                "import_peft(params=...)",
                "the base parameter tree (array or ShapeDtypeStruct leaves), or None to read the kernels from the file",
                params,
                "the order is import_peft(path, params)",
            )
        )
    mapped = None
    if key_mapping is not None:  # {path: HfTarget}, and the names as a name_map
        from lora_jax.io._key_mapping_import import from_torch_order, kernel_from_torch, mapped_targets

        mapped = mapped_targets(key_mapping, flat, axes, lora_parts, full_parts)
        name_map = {p: t.module for p, t in mapped.items()}
    out: dict[str, Any] = {}
    used: set[str] = set()
    ranks, alphas, layouts = {}, {}, {}
    for p, leaf in flat.items():
        shape = tuple(leaf.shape)
        if mapped is not None and p not in mapped:
            continue
        if (mapped is None and p.rpartition("/")[2] not in _KERNEL_KEYS) or len(shape) < 2:
            continue
        layout = _first(axes, p, None)
        if layout is None:
            layout = "io" if len(shape) == 2 else "iiio" if len(shape) == 4 else None
        if layout is None or len(layout) != len(shape):
            continue
        nb = layout.count("b")
        template = _name_or_none(name_map, p)
        if template is None:
            continue
        try:
            names = expand(template, p, layout, shape[:nb])
        except ValueError:
            if not any(n.startswith(template.split("{")[0]) for n in lora_parts):
                continue  # not in the file: no adapter here
            raise
        present = [n for n in names.values() if n in lora_parts]
        if not present:
            continue
        missing = [n for n in names.values() if n not in lora_parts]
        if missing:
            raise ValueError(
                f"{p}: the PEFT adapter has layers {present[:3]} of this stacked kernel but lacks "
                f"{missing[:3]} ({len(missing)} missing); PEFT would leave those layers unadapted."
            )
        core = layout.replace("b", "")
        kshape = tuple(s for s, c in zip(shape, layout, strict=True) if c != "b")
        got = {idx: _from_peft(n, lora_parts[n], kshape, core, p) for idx, n in names.items()}
        if mapped is not None:  # the torch weight's element order back to the kernel's
            got = {idx: from_torch_order(mapped[p], *g) for idx, g in got.items()}
        rs = {g[0].shape[-1] for g in got.values()}
        al = set()
        for n, g in zip(names.values(), got.values(), strict=True):
            r = g[0].shape[-1]
            key = pattern_key(rank_pattern, n)
            if (rank_pattern[key] if key is not None else r0) != r:
                raise ValueError(f"{path}: module {n!r} has rank {r} in the tensors but the config says "
                                 f"{rank_pattern[key] if key is not None else r0}.")  # fmt: skip
            key = pattern_key(alpha_pattern, n)
            al.add(float(alpha_pattern[key]) if key is not None else alpha0)
        if len(rs) > 1 or len(al) > 1:
            raise ValueError(
                f"{p}: the PEFT layers {list(names.values())[:3]}... of this stacked kernel have different "
                f"ranks {sorted(rs)} or alphas {sorted(al)}; one stacked adapter needs one rank and alpha."
            )
        (r,), (alpha,) = rs, al
        kinds = {g[2] for g in got.values()}
        a = np.stack([g[0] for g in got.values()]).reshape(*shape[:nb], *got[next(iter(got))][0].shape)
        b = np.stack([g[1] for g in got.values()]).reshape(*shape[:nb], *got[next(iter(got))][1].shape)
        scale = lora_scale(r, alpha, rslora=rslora)
        mags = [g[3] for g in got.values()]
        if any((mg is None) == use_dora for mg in mags):
            raise ValueError(
                expected(
                    f"{path}: module {next(iter(names.values()))!r}",
                    f"{'a' if use_dora else 'no'} {MAGNITUDE} (the config says use_dora={str(use_dora).lower()})",
                    f"{'none' if use_dora else 'one'}",
                    "The adapter files are inconsistent; save them again with PEFT",
                    found_is_text=True,
                )
            )
        if use_dora:
            m = np.stack(mags).reshape(*shape[:nb], *mags[0].shape)
            out[p] = DoraWeights(
                jnp.asarray(a),
                jnp.asarray(b),
                jnp.asarray(m),
                scale=scale,
                layout=layout,
                kind=kinds.pop(),
                dropout=dropout,
            )
        else:
            out[p] = LoraWeights(
                jnp.asarray(a), jnp.asarray(b), scale=scale, layout=layout, kind=kinds.pop(), dropout=dropout
            )
        used.update(names.values())
        ranks[p], alphas[p], layouts[p] = r, alpha, layout
    full_used: set[tuple[str, str]] = set()
    trainable = []
    for p, leaf in flat.items():
        name = _name_or_none(name_map, p)
        if name is None or name not in full_parts:
            continue
        key = p.rpartition("/")[2]
        tkey = "bias" if key == "bias" else "weight"
        if tkey not in full_parts[name]:
            continue
        if mapped is not None:
            value = kernel_from_torch(mapped[p], full_parts[name][tkey], tuple(leaf.shape))
        else:
            value = _full_value(p, tuple(leaf.shape), full_parts[name][tkey], axes)
        out[p] = Trainable(jnp.asarray(value, dtype=leaf.dtype))
        full_used.add((name, tkey))
        trainable.append(p)
    left = sorted(set(lora_parts) - used) + sorted(
        f"{m}.{k}" for m, ks in full_parts.items() for k in ks if (m, k) not in full_used
    )
    if left:
        near = difflib.get_close_matches(
            left[0], sorted({n for p in flat if (n := _name_or_none(name_map, p))}), n=3, cutoff=0.0
        )
        raise ValueError(
            f"{path}: {len(left)} PEFT module(s) match no parameter: {', '.join(left[:6])} (nearest module names "
            f"from params: {', '.join(near) or 'none'}). Pass a name_map (and axes for multi-axis kernels) that "
            f"maps parameter paths to these torch module names."
        )
    if not out:
        raise ValueError(f"{path}: the PEFT adapter is empty.")
    dtype = next((x.a.dtype for x in out.values() if type(x) in (LoraWeights, DoraWeights)), jnp.float32)
    spec = LoraSpec(
        rank=r0,
        alpha=alpha0,
        targets="|".join(re.escape(p) for p in sorted(ranks)),
        rank_pattern={_exact(p): r for p, r in ranks.items() if r != r0},
        alpha_pattern={_exact(p): a for p, a in alphas.items() if a != alpha0},
        rslora=rslora,
        axes={_exact(p): lay for p, lay in layouts.items() if lay != "io"},
        trainable="|".join(re.escape(p) for p in sorted(trainable)) or None,
        dropout=dropout,
        dtype=jnp.dtype(dtype).name,
        dora=use_dora,
    )
    return nest(dict(sorted(out.items()))), spec
