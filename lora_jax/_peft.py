"""Hugging Face PEFT interchange: ``export_peft`` / ``import_peft``.

Files: ``adapter_config.json`` and ``adapter_model.safetensors`` (metadata
``{"format": "pt"}``), keys ``base_model.model.<module>.lora_A.weight`` and so
on, exactly what ``peft.PeftModel.from_pretrained`` reads. Torch is never
imported: arrays go through ``safetensors.numpy``.

Layouts (how a flax kernel corresponds to the torch module):

* ``"io"`` Dense ``(in, out)`` <-> ``nn.Linear(in, out)``, weight ``(out, in)``;
  ``lora_A (r, in)``, ``lora_B (out, r)``.
* multi-axis kernels flatten to PEFT's 2-D view: the input axes (in kernel
  order, row-major) become ``in_features``, the output axes ``out_features``.
  A ``DenseGeneral`` ``(d, heads, head_dim)`` (``"ioo"``) is
  ``nn.Linear(d, heads * head_dim)`` with weight
  ``kernel.reshape(d, -1).T``; ``(heads, head_dim, d)`` (``"iio"``) is
  ``nn.Linear(heads * head_dim, d)``.
* ``"iiio"`` Conv ``(kh, kw, in, out)`` <-> ``nn.Conv2d(in, out, (kh, kw))``,
  weight ``kernel.transpose(3, 2, 0, 1)``; ``lora_A (r, in, kh, kw)``,
  ``lora_B (out, r, 1, 1)`` (``conv=`` selects which kernels are convolutions).
* embeddings ``(num, dim)`` <-> ``nn.Embedding``: ``lora_embedding_A (r, num)``,
  ``lora_embedding_B (dim, r)``.
* stacked-layer axes ``"b"``: one module per layer index (see
  :mod:`lora_jax._peft_names`).
"""

from __future__ import annotations

import difflib
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax import _layout
from lora_jax._adapters import LoraWeights, Trainable
from lora_jax._apply import adapter_items
from lora_jax._paths import flatten_with_paths, nest
from lora_jax._peft_names import (
    EMBED_A,
    EMBED_B,
    LORA_A,
    LORA_B,
    LORA_PARTS,
    PREFIX,
    NameMap,
    expand,
    export_pattern_key,
    module_name,
    pattern_key,
)
from lora_jax._spec import LoraSpec
from lora_jax._targets import _first

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KERNEL_KEYS = ("kernel", "embedding", "weight")


def to_host(x: Any) -> np.ndarray:
    """A full NumPy copy of ``x``, gathered across processes when it is not fully addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _is_conv(conv: Any, path: str, layout: str) -> bool:
    core = layout.replace("b", "")
    if conv == "auto":
        return core == "iiio"
    if conv is None:
        return False
    from lora_jax._targets import selector_matches

    if selector_matches(conv, path, None):
        if core != "i" * (len(core) - 1) + "o" or len(core) < 3:
            raise ValueError(
                f"{path}: conv=... selects a kernel with layout {layout!r}; a convolution kernel is "
                f"(*spatial, in, out), layout 'iio' (1-D), 'iiio' (2-D) or 'iiiio' (3-D)."
            )
        return True
    return False


def _lora_tensors(a: np.ndarray, b: np.ndarray, layout: str, conv: bool) -> tuple[np.ndarray, np.ndarray]:
    """One layer's A ``(*in, r)`` and B ``(r, *out)`` as PEFT's ``lora_A`` and ``lora_B`` weights."""
    r = a.shape[-1]
    if conv:  # A: (*spatial, in, r) -> (r, in, *spatial); B: (r, out) -> (out, r, 1, ...)
        n = a.ndim
        pa = a.transpose(n - 1, n - 2, *range(n - 2))
        pb = b.reshape(r, -1).T.reshape(-1, r, *([1] * (n - 2)))
        return np.ascontiguousarray(pa), np.ascontiguousarray(pb)
    return np.ascontiguousarray(a.reshape(-1, r).T), np.ascontiguousarray(b.reshape(r, -1).T)


def _trainable_tensor(path: str, value: np.ndarray, spec: LoraSpec, conv: Any) -> tuple[str, np.ndarray]:
    """The torch parameter name and value of a leaf trained in full."""
    key = path.rpartition("/")[2]
    if key in ("bias",):
        return "bias", value.reshape(-1)
    if key in ("scale", "weight") and value.ndim == 1:
        return "weight", value
    if key in ("embedding", "weight") and value.ndim == 2:
        return "weight", value
    if key == "kernel":
        layout = _first(spec.axes, path, "io" if value.ndim == 2 else None)
        if layout is not None and "b" not in layout and len(layout) == value.ndim:
            if _is_conv(conv, path, layout):
                n = value.ndim
                return "weight", np.ascontiguousarray(value.transpose(n - 1, n - 2, *range(n - 2)))
            ins, outs = _layout.axes_of(layout, "i"), _layout.axes_of(layout, "o")
            flat = value.transpose(*ins, *outs).reshape(_layout.fan_in(layout, value.shape), -1)
            return "weight", np.ascontiguousarray(flat.T)
    raise ValueError(
        f"{path}: cannot export this leaf trained in full (shape {value.shape}) as a torch parameter: "
        f"supported are 'kernel' (2-D, or with a layout in LoraSpec(axes=...) without stacked axes), "
        f"'embedding', 'bias' and 'scale'. Leave it out of LoraSpec(trainable=...)."
    )


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    path: str | os.PathLike,
    lora: Any,
    spec: LoraSpec,
    *,
    name_map: NameMap = None,
    conv: Any = "auto",
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> pathlib.Path:
    """Write an adapter in Hugging Face PEFT's format (``PeftModel.from_pretrained`` loads it).

    Sharded and not fully addressable arrays are gathered first; on several
    processes every process must call this (the gather is collective) and only
    process 0 writes. Files are written into a temporary directory that is
    renamed into place, so a failed export leaves no partial adapter.

    Args:
      path: directory to create (holds ``adapter_config.json`` and
        ``adapter_model.safetensors``).
      lora: the adapter tree.
      spec: its :class:`LoraSpec` (for ``r``, ``lora_alpha``, ``use_rslora``,
        ``lora_dropout``); per-module ranks and alphas that differ from it are
        written to ``rank_pattern`` / ``alpha_pattern``.
      name_map: parameter path -> torch module name: None (drop the leaf key,
        join keys with "."), a dict, or a callable; see
        :mod:`lora_jax._peft_names`.
      conv: which kernels are convolutions: ``"auto"`` (layout ``"iiio"``, a
        Conv2D), None, or a selector like ``LoraSpec(targets=...)``.
      base_model_name_or_path: written to the config (e.g. a Hub model id).
      overwrite: replace an existing adapter directory.

    Returns:
      The absolute path written.

    Raises:
      ValueError: if a stacked kernel's module name does not place the layer
        index, two adapters map to one module name, or a leaf trained in full
        has no torch equivalent.
      FileExistsError: if ``path`` exists and ``overwrite`` is False.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os, json
      >>> from lora_jax import init_lora
      >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}}}
      >>> spec = LoraSpec(rank=2, alpha=4.0, targets=["q_proj"])
      >>> out = export_peft(os.path.join(tempfile.mkdtemp(), "peft"), init_lora(jax.random.key(0), params, spec), spec)
      >>> json.loads((out / "adapter_config.json").read_text())["target_modules"]
      ['model.q_proj']
      >>> from safetensors.numpy import load_file
      >>> {k: v.shape for k, v in load_file(out / "adapter_model.safetensors").items()}
      {'base_model.model.model.q_proj.lora_A.weight': (2, 8), 'base_model.model.model.q_proj.lora_B.weight': (4, 2)}
    """
    from safetensors.numpy import save_file

    path = pathlib.Path(path).absolute()
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass export_peft(..., overwrite=True) to replace it.")
    tensors: dict[str, np.ndarray] = {}
    owner: dict[str, str] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    saved_modules: list[str] = []

    def claim(name: str, p: str) -> None:
        if name in owner and owner[name] != p:
            raise ValueError(
                f"{p}: name_map gives module name {name!r}, which {owner[name]} already has; "
                f"every adapted kernel needs its own torch module name."
            )
        owner[name] = p

    for p, node in adapter_items(lora).items():
        if isinstance(node, Trainable):
            name = module_name(name_map, p)
            key, value = _trainable_tensor(p, to_host(node.value), spec, conv)
            claim(f"{name}.{key}", p)
            tensors[f"{PREFIX}{name}.{key}"] = value
            if name not in saved_modules:
                saved_modules.append(name)
            continue
        layout = node.layout
        nb = layout.count("b")
        a, b = to_host(node.a), to_host(node.b)
        names = expand(module_name(name_map, p), p, layout, a.shape[:nb])
        is_conv = _is_conv(conv, p, layout)
        # alpha from the static scale; 12 significant digits undo float rounding (7/sqrt(2)*sqrt(2) -> 7)
        alpha = float(f"{node.scale * (math.sqrt(node.rank) if spec.rslora else node.rank):.12g}")
        for idx, name in names.items():
            claim(name, p)
            la, lb = _lora_tensors(a[idx], b[idx], layout.replace("b", ""), is_conv)
            ka, kb = (EMBED_A, EMBED_B) if node.kind == "embed" else (LORA_A, LORA_B)
            tensors[f"{PREFIX}{name}.{ka}"], tensors[f"{PREFIX}{name}.{kb}"] = la, lb
            ranks[name], alphas[name] = node.rank, alpha
    targets = sorted(ranks)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": _number(spec.alpha),
        "target_modules": targets,
        "use_rslora": spec.rslora,
        "rank_pattern": {export_pattern_key(m, targets): r for m, r in ranks.items() if r != spec.rank},
        "alpha_pattern": {
            export_pattern_key(m, targets): _number(a)
            for m, a in alphas.items()
            if not math.isclose(a, spec.alpha, rel_tol=1e-12)
        },
        "lora_dropout": spec.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": saved_modules or None,
        "init_lora_weights": True,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
            if path.exists():
                old = pathlib.Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
                os.replace(path, old / "x")
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"lora_jax.export_peft:{path}")
    return path


# ---------------------------------------------------------------------------- import


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config dict and tensors (without the ``base_model.model.`` prefix) of a PEFT adapter."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = pathlib.Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such PEFT adapter directory.")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(f"{path}: not a PEFT adapter (expected {CONFIG} and {WEIGHTS} inside).")
    try:
        config = json.loads((path / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / CONFIG}: not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path / CONFIG}: peft_type is {found!r}; only LORA adapters can be imported.")
    unsupported = {
        "use_dora": (False, None),
        "bias": ("none", None),
        "lora_bias": (False, None),
        "layer_replication": (None,),
        "target_parameters": (None, []),
        "trainable_token_indices": (None,),
    }
    for key, ok in unsupported.items():
        if key in config and config[key] not in ok:
            raise ValueError(f"{path / CONFIG}: {key}={config[key]!r} is not supported by lora_jax's importer.")
    try:
        raw = load_file(path / WEIGHTS)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(
            f"{path / WEIGHTS}: cannot read the tensors, the file is corrupt or truncated ({e})."
        ) from None
    tensors = {}
    for k, v in raw.items():
        if not k.startswith(PREFIX):
            raise ValueError(f"{path / WEIGHTS}: key {k!r} lacks PEFT's {PREFIX!r} prefix; not a PEFT LoRA file.")
        tensors[k[len(PREFIX) :]] = v
    return config, tensors


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
    """(A ``(*in, r)``, B ``(r, *out)``, kind) of one module, checked against the kernel ``shape``."""
    embed = EMBED_A in parts or EMBED_B in parts
    ka, kb = (EMBED_A, EMBED_B) if embed else (LORA_A, LORA_B)
    if set(parts) != {ka, kb}:
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
    return a, b, "embed" if embed else "linear"


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
    return value.reshape(leaf_shape)


def import_peft(
    path: str | os.PathLike,
    params: Any,
    *,
    name_map: NameMap = None,
    axes: Any = None,
) -> tuple[dict[str, Any], LoraSpec]:
    """Read a PEFT LoRA adapter into ``(lora, spec)`` for these params.

    ``apply_lora(params, lora)`` reproduces PEFT's merged weights. Every tensor
    in the file must land on a parameter and every layer of a stacked kernel
    must be present: unknown or missing keys raise, listing them.

    Args:
      path: a PEFT adapter directory (``save_pretrained`` output).
      params: the base parameters (arrays or ``jax.ShapeDtypeStruct``).
      name_map: parameter path -> torch module name, as for
        :func:`export_peft`.
      axes: kernel layouts ``{pattern: layout}`` for kernels with more than
        two axes, as ``LoraSpec(axes=...)`` (2-D kernels are ``"io"``; a 4-D
        kernel whose ``lora_A`` is 4-D is a Conv2D ``"iiio"``).

    Returns:
      ``(lora, spec)``: the adapter tree and a :class:`LoraSpec` that selects
      exactly the imported paths with their ranks, alphas and layouts.

    Raises:
      FileNotFoundError / ValueError: on a missing or malformed adapter,
        unknown keys, missing layers, or shapes that do not fit ``params``.

    Example:
      >>> import jax, jax.numpy as jnp, tempfile, os
      >>> from lora_jax import init_lora
      >>> params = {"model": {"q_proj": {"kernel": jnp.ones((8, 4))}}}
      >>> spec = LoraSpec(rank=2, alpha=4.0, targets=["q_proj"], init="random")
      >>> lora = init_lora(jax.random.key(0), params, spec)
      >>> back, spec2 = import_peft(export_peft(os.path.join(tempfile.mkdtemp(), "p"), lora, spec), params)
      >>> bool(jnp.all(back["model"]["q_proj"]["kernel"].b == lora["model"]["q_proj"]["kernel"].b)), spec2.rank
      (True, 2)
    """
    path = pathlib.Path(path)
    config, tensors = read_peft(path)
    axes = LoraSpec(axes=axes or ()).axes
    saved = list(config.get("modules_to_save") or [])
    lora_parts, full_parts, unknown = _split_keys(tensors, saved)
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} tensor(s) are neither LoRA weights nor modules_to_save: "
            f"{', '.join(unknown[:6])}. lora_jax imports plain LoRA adapters (no DoRA, no LoRA biases)."
        )
    r0, alpha0, rslora = int(config.get("r", 8)), float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    flat = {p: x for p, x in flatten_with_paths(params).items() if hasattr(x, "shape")}
    out: dict[str, Any] = {}
    used: set[str] = set()
    ranks, alphas, layouts = {}, {}, {}
    for p, leaf in flat.items():
        shape = tuple(leaf.shape)
        if p.rpartition("/")[2] not in _KERNEL_KEYS or len(shape) < 2:
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
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        out[p] = LoraWeights(jnp.asarray(a), jnp.asarray(b), scale=scale, layout=layout, kind=kinds.pop())
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
    dtype = next((x.a.dtype for x in out.values() if isinstance(x, LoraWeights)), jnp.float32)
    spec = LoraSpec(
        rank=r0,
        alpha=alpha0,
        targets="|".join(re.escape(p) for p in sorted(ranks)),
        rank_pattern={_exact(p): r for p, r in ranks.items() if r != r0},
        alpha_pattern={_exact(p): a for p, a in alphas.items() if a != alpha0},
        rslora=rslora,
        axes={_exact(p): lay for p, lay in layouts.items() if lay != "io"},
        trainable="|".join(re.escape(p) for p in sorted(trainable)) or None,
        dropout=float(config.get("lora_dropout") or 0.0),
        dtype=jnp.dtype(dtype).name,
    )
    return nest(dict(sorted(out.items()))), spec
