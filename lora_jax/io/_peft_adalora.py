"""AdaLoRA in PEFT's format: ``lora_A``/``lora_E``/``lora_B`` per module, the kept triplets in ``rank_pattern``.

What PEFT's ``save_pretrained`` writes for an ``AdaLoraConfig`` model (read
from PEFT 0.21's ``AdaLoraModel._get_adapter_state_dict`` and
``resize_state_dict_by_rank_pattern``):

* ``base_model.model.<module>.lora_A (k, in)``, ``.lora_E (k, 1)`` and
  ``.lora_B (out, k)`` (no ``.weight``: they are parameters, not modules),
  with ``k`` the number of KEPT triplets: after the allocator has pruned,
  the pruned rows and columns are dropped from the file, not stored as zeros;
* ``adapter_config.json`` with ``peft_type`` ``"ADALORA"``, ``init_r`` (the
  rank before pruning), the schedule (``target_r``, ``tinit``, ``tfinal``,
  ``deltaT``, ``beta1``, ``beta2``, ``total_step``, ``orth_reg_weight``) and
  ``rank_pattern`` ``{"<module>.lora_E": [kept, ...]}`` (``init_r`` booleans
  per module; keys without the ``base_model.model.`` prefix and without the
  adapter name, which PEFT strips before saving), or null before any pruning
  (then ``k = init_r``);
* ``ranknum`` is not saved: PEFT keeps it at ``init_r`` when it resizes the
  modules on load, so the scale stays ``lora_alpha / (init_r + 1e-5)``.

lora_jax keeps every node at ``init_r`` (``e = 0`` where pruned, the
allocator's mask says which): :func:`lora_jax.import_peft` puts the kept
triplets back at their indices (zeros at the pruned ones) and
:func:`import_adalora_allocation` gives the mask and schedule;
:func:`lora_jax.export_peft` with ``allocation=`` drops the pruned triplets
and writes the ``rank_pattern``. 2-D ``"io"`` kernels only (PEFT's AdaLoRA
adapts ``nn.Linear``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.adapters._adalora import AdaLoraWeights, adalora_scale
from lora_jax.adapters._tree import adapter_items
from lora_jax.errors._messages import expected
from lora_jax.io._files import as_path, check_replaceable, replace_dir, returned, sibling
from lora_jax.io._peft_names import CONFIG, PREFIX, WEIGHTS, NameMap, module_name
from lora_jax.io._safetensors import read_tensors
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, nest

_PARTS = ("lora_A", "lora_E", "lora_B")
_SCHEDULE = {"target_r": None, "total_step": 1, "tinit": 0, "tfinal": 0, "deltaT": 1, "beta1": 0.85, "beta2": 0.85}


class AdaLoraAllocation(NamedTuple):
    """What PEFT's AdaLoRA config holds beside the tensors: the kept triplets and the allocator's schedule.

    Attributes:
      mask: ``{kernel path: bool (r,)}``, the kept triplets (``AdaLoraState.mask``), or None (nothing pruned).
      schedule: :func:`lora_jax.adalora_allocator`'s keyword arguments (``target_r``, ``total_step``,
        ``tinit``, ``tfinal``, ``deltaT``, ``beta1``, ``beta2``); missing ones take PEFT's defaults
        (``target_r`` the rank, ``total_step`` 1); None for all defaults.
      orth_reg_weight: the weight of :func:`lora_jax.orthogonal_regularizer` in the loss (PEFT's 0.5).

    Example:
      >>> import numpy as np
      >>> AdaLoraAllocation({"dense/kernel": np.array([True, False])}, {"target_r": 1, "total_step": 10}).orth_reg_weight
      0.5
    """

    mask: dict[str, Any] | None = None
    schedule: dict[str, Any] | None = None
    orth_reg_weight: float = 0.5


def is_adalora(path: Any) -> bool:
    """Whether the PEFT adapter directory at ``path`` holds an AdaLoRA adapter (``peft_type`` ``"ADALORA"``)."""
    try:
        return json.loads((as_path(path) / CONFIG).read_text()).get("peft_type") == "ADALORA"
    except (OSError, ValueError, AttributeError):
        return False  # the LoRA reader reports what is wrong


def has_adalora(lora: Any) -> bool:
    """Whether an adapter tree holds AdaLoRA nodes."""
    return any(type(n) is AdaLoraWeights for n in adapter_items(lora).values())


def _schedule(schedule: Any, rank: int) -> dict[str, Any]:
    schedule = {} if schedule is None else schedule
    if not isinstance(schedule, dict) or set(schedule) - set(_SCHEDULE):
        raise ValueError(
            expected(
                "export_peft(allocation=AdaLoraAllocation(schedule=...))",
                f"a dict with keys among {sorted(_SCHEDULE)} (adalora_allocator's keyword arguments)",
                schedule,
            )
        )
    out = {**_SCHEDULE, "target_r": rank, **schedule}
    if out["tinit"] >= out["total_step"] - out["tfinal"]:
        raise ValueError(
            expected(
                "export_peft(allocation=AdaLoraAllocation(schedule=...))",
                "tinit < total_step - tfinal (PEFT's AdaLoraConfig refuses to load anything else)",
                f"total_step={out['total_step']}, tinit={out['tinit']}, tfinal={out['tfinal']}",
                found_is_text=True,
            )
        )
    return out


def _kept(allocation: Any, path: str, node: AdaLoraWeights) -> np.ndarray | None:
    mask = None if allocation.mask is None else allocation.mask.get(path)
    if mask is None:
        if allocation.mask:
            raise ValueError(
                expected(
                    f"export_peft(allocation=...).mask[{path!r}]",
                    "a mask for every AdaLoRA kernel (PEFT's rank_pattern names every module)",
                    f"masks for {sorted(allocation.mask)[:4]}",
                    found_is_text=True,
                )
            )
        return None
    mask = np.asarray(mask)
    if mask.dtype != bool or mask.shape != node.e.shape:
        raise ValueError(
            expected(f"export_peft(allocation=...).mask[{path!r}]", f"a bool array of shape {node.e.shape}", mask)
        )
    return mask


def export_adalora(
    path: Any,
    lora: Any,
    spec: LoraSpec,
    *,
    allocation: Any = None,
    name_map: NameMap = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Write an AdaLoRA adapter tree in PEFT's format (see the module docstring); ``PeftModel.from_pretrained`` loads it."""
    from safetensors.numpy import save

    from lora_jax.io._peft_export import _host_float
    from lora_jax.transforms._adalora_allocator import AdaLoraState

    path = as_path(path)
    if isinstance(allocation, AdaLoraState):
        allocation = AdaLoraAllocation(mask=dict(allocation.mask))
    if allocation is None:
        allocation = AdaLoraAllocation()
    if not isinstance(allocation, AdaLoraAllocation):
        raise TypeError(
            expected(
                "export_peft(allocation=...)",
                "an AdaLoraAllocation(mask, schedule, orth_reg_weight), an AdaLoraState or None",
                allocation,
            )
        )
    schedule = _schedule(allocation.schedule, spec.rank)
    scale = adalora_scale(spec.rank, spec.alpha)
    tensors, targets, pattern = {}, [], {}
    for p, node in adapter_items(lora).items():
        ok = type(node) is AdaLoraWeights and node.layout == "io" and node.kind == "linear"
        if not ok or node.rank != spec.rank or not math.isclose(node.scale, scale, rel_tol=1e-9):
            raise ValueError(
                expected(
                    f"export_peft(lora=...) at {p}",
                    f"an AdaLoraWeights node of a 2-D 'io' kernel with rank {spec.rank} and scale {scale:.6g} "
                    "(PEFT's AdaLoRA adapts nn.Linear with one init_r and lora_alpha)",
                    node if not ok else f"rank {node.rank}, scale {node.scale:.6g}",
                    found_is_text=ok,
                )
            )
        kept = _kept(allocation, p, node)
        name = module_name(name_map, p)
        if name in targets:
            raise ValueError(f"{p}: name_map gives module name {name!r} to two kernels.")
        targets.append(name)
        a, e, b = (_host_float(x, f"export_peft(lora=...) at {p}") for x in (node.a, node.e, node.b))
        idx = np.arange(spec.rank) if kept is None else np.flatnonzero(kept)
        tensors[f"{PREFIX}{name}.lora_A"] = np.ascontiguousarray(a.T[idx])
        tensors[f"{PREFIX}{name}.lora_E"] = np.ascontiguousarray(e[idx][:, None])
        tensors[f"{PREFIX}{name}.lora_B"] = np.ascontiguousarray(b.T[:, idx])
        if kept is not None:
            pattern[f"{name}.lora_E"] = [bool(k) for k in kept]
    alpha = float(spec.alpha)
    config = {
        "peft_type": "ADALORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": 8,  # LoraConfig's default: AdaLoRA ignores r (and warns when it is not 8)
        "init_r": spec.rank,
        **schedule,
        "orth_reg_weight": float(allocation.orth_reg_weight),
        "rank_pattern": pattern or None,
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(targets),
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass export_peft(..., overwrite=True) to replace it.")
        check_replaceable(path, frozenset({CONFIG, WEIGHTS, "README.md"}), "export_peft(path=...)", "a PEFT adapter")
    if jax.process_index() != 0:
        return returned(path)
    tmp = sibling(path, ".lora_jax-new")
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    (tmp / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, path, old=sibling(path, ".lora_jax-old"))
    return returned(path)


def _config(path: Any) -> dict[str, Any]:
    file = path / CONFIG
    config = json.loads(file.read_text())
    for key, want in (("bias", "none"), ("fan_in_fan_out", False), ("modules_to_save", None), ("use_dora", False)):
        if config.get(key, want) not in (want, [] if want is None else want):
            raise ValueError(
                expected(
                    f"{file}: {key}",
                    f"{json.dumps(want)} (lora_jax imports AdaLoRA adapters of nn.Linear modules only)",
                    config.get(key),
                )
            )
    init_r, alpha = config.get("init_r", 12), config.get("lora_alpha", 8)
    if not isinstance(init_r, int) or init_r <= 0 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ValueError(
            expected(
                f"{file}: init_r / lora_alpha",
                "a positive integer and a positive number (with lora_alpha 0 PEFT scales by the kept rank)",
                f"{init_r!r} / {alpha!r}",
                found_is_text=True,
            )
        )
    return config


def _pattern(file: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    """``rank_pattern`` as ``{module name: bool (init_r,)}``."""
    out = {}
    for key, kept in (config.get("rank_pattern") or {}).items():
        ok = isinstance(kept, list) and len(kept) == config.get("init_r", 12) and all(type(k) is bool for k in kept)
        if not key.endswith(".lora_E") or not ok:
            raise ValueError(
                expected(
                    f"{file}: rank_pattern[{key!r}]",
                    f"'<module>.lora_E': a list of {config.get('init_r', 12)} booleans (PEFT's saved rank_pattern)",
                    kept,
                )
            )
        out[key[: -len(".lora_E")]] = np.asarray(kept, bool)
    return out


def _skeleton(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    flat = {}
    for key, la in tensors.items():
        if key.startswith(PREFIX) and key.endswith(".lora_A") and f"{key[:-7]}.lora_B" in tensors:
            name = key[len(PREFIX) : -len(".lora_A")]
            flat[name.replace(".", "/") + "/kernel"] = jax.ShapeDtypeStruct(
                (la.shape[1], tensors[f"{key[:-7]}.lora_B"].shape[0]), la.dtype
            )
    return nest(flat)


def _read(path: Any, params: Any, name_map: NameMap) -> tuple[dict, LoraSpec, AdaLoraAllocation]:
    path = as_path(path)
    config = _config(path)
    pattern = _pattern(path / CONFIG, config)
    tensors = read_tensors((path / WEIGHTS).read_bytes(), path / WEIGHTS)
    tensors = {k: v for k, v in tensors.items() if not k.endswith(".ranknum")}  # older PEFT saved it; always init_r
    if params is None:
        if name_map is not None:
            raise ValueError("import_peft(params=None) reads the kernels from the file; name_map needs params.")
        params = _skeleton(tensors)
    init_r, alpha = int(config.get("init_r", 12)), float(config.get("lora_alpha", 8))
    out, mask, used = {}, {}, set()
    for p, leaf in flatten_with_paths(params).items():
        if p.rpartition("/")[2] != "kernel" or len(getattr(leaf, "shape", ())) != 2:
            continue
        name = module_name(name_map, p)
        keys = [f"{PREFIX}{name}.{part}" for part in _PARTS]
        if not any(k in tensors for k in keys):
            continue
        kept = pattern.pop(name, np.ones(init_r, bool))
        k, (n_in, n_out) = int(kept.sum()), leaf.shape
        want = {keys[0]: (k, n_in), keys[1]: (k, 1), keys[2]: (n_out, k)}
        if any(tensors.get(key, np.zeros(0)).shape != shape for key, shape in want.items()):
            raise ValueError(
                expected(
                    f"{p}: PEFT module {name!r}",
                    f"lora_A {want[keys[0]]}, lora_E {want[keys[1]]} and lora_B {want[keys[2]]} for a kernel "
                    f"{tuple(leaf.shape)} with {k} of init_r={init_r} triplets kept (rank_pattern)",
                    ", ".join(f"{kk.rpartition('.')[2]} {getattr(tensors.get(kk), 'shape', None)}" for kk in keys),
                    "The adapter was made for another model, or name_map points this path at the wrong module",
                    found_is_text=True,
                )
            )
        la, le, lb = (tensors[key] for key in keys)
        a, e, b = np.zeros((n_in, init_r), la.dtype), np.zeros(init_r, le.dtype), np.zeros((init_r, n_out), lb.dtype)
        a[:, kept], e[kept], b[kept] = la.T, le[:, 0], lb.T
        used.update(keys)
        mask[p] = kept
        out[p] = AdaLoraWeights(
            jnp.asarray(a),
            jnp.asarray(e),
            jnp.asarray(b),
            scale=adalora_scale(init_r, alpha),
            dropout=float(config.get("lora_dropout", 0.0)),
        )
    left = sorted(set(tensors) - used)
    if left or pattern:
        raise ValueError(
            f"{path}: {len(left)} tensor(s) and {len(pattern)} rank_pattern entrie(s) land on no 2-D kernel of "
            f"params: {', '.join([*left[:4], *list(pattern)[:2]])}. Pass a name_map that maps parameter paths to "
            f"these torch module names."
        )
    if not out:
        raise ValueError(f"{path}: the PEFT AdaLoRA adapter is empty.")
    dtype = jnp.dtype(next(iter(out.values())).a.dtype).name
    spec = LoraSpec(
        rank=init_r,
        alpha=alpha,
        targets="|".join(re.escape(p) for p in sorted(out)),
        adalora=True,
        dropout=float(config.get("lora_dropout", 0.0)),
        dtype=dtype if dtype in ("float16", "bfloat16", "float32", "float64") else "float32",
    )
    schedule = {key: config.get(key, default) for key, default in _SCHEDULE.items()}
    schedule["target_r"] = config.get("target_r", 8)
    allocation = AdaLoraAllocation(
        mask=mask if config.get("rank_pattern") else None,
        schedule=schedule,
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
    )
    return nest(dict(sorted(out.items()))), spec, allocation


def import_adalora(path: Any, params: Any, *, name_map: NameMap = None) -> tuple[dict[str, Any], LoraSpec]:
    """A PEFT AdaLoRA adapter as ``(lora, spec)``: every node at ``init_r``, zeros at the pruned triplets."""
    lora, spec, _ = _read(path, params, name_map)
    return lora, spec


def import_adalora_allocation(path: Any, params: Any = None, *, name_map: NameMap = None) -> AdaLoraAllocation:
    """The kept triplets and the schedule of a PEFT AdaLoRA adapter, to resume training with the allocator.

    ``mask`` is ``{kernel path: bool (init_r,)}`` from the config's
    ``rank_pattern`` (None when the adapter was saved before any pruning);
    the schedule holds :func:`lora_jax.adalora_allocator`'s keyword arguments.
    Resume with ``tx = adalora_allocator(inner, **allocation.schedule)`` and
    ``state = tx.init(lora)._replace(mask=allocation.mask)``.

    Args:
      path: a PEFT AdaLoRA adapter directory (``save_pretrained`` output).
      params: the base parameters, or None to take 2-D kernels from the file, as :func:`lora_jax.import_peft`.
      name_map: parameter path -> torch module name, as :func:`lora_jax.export_peft`.

    Returns:
      An :class:`AdaLoraAllocation`.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, tempfile, os
      >>> from lora_jax import LoraSpec, init_lora, export_peft
      >>> params = {"dense": {"kernel": jnp.ones((4, 3))}}
      >>> spec = LoraSpec(rank=2, targets=["dense"], adalora=True)
      >>> lora = init_lora(jax.random.key(0), params, spec)
      >>> done = AdaLoraAllocation({"dense/kernel": np.array([True, False])}, {"target_r": 1, "total_step": 10})
      >>> out = export_peft(os.path.join(tempfile.mkdtemp(), "p"), lora, spec, allocation=done)
      >>> got = import_adalora_allocation(out, params)
      >>> got.mask["dense/kernel"].tolist(), got.schedule["total_step"]
      ([True, False], 10)
    """
    if not is_adalora(path):
        raise ValueError(
            expected(
                "import_adalora_allocation(path=...)",
                f"a PEFT AdaLoRA adapter directory ({CONFIG} with peft_type 'ADALORA')",
                str(path),
                found_is_text=True,
            )
        )
    return _read(path, params, name_map)[2]
