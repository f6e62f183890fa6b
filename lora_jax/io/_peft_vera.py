"""VeRA in PEFT's format: ``vera_lambda_d``/``vera_lambda_b`` per module, the projections once.

PEFT (``VeraConfig(save_projection=True)``, its default) saves
``base_model.vera_A (r, max_in)`` and ``base_model.vera_B (max_out, r)`` once
and ``base_model.model.<module>.vera_lambda_d (r)`` and ``.vera_lambda_b
(out)`` per adapted ``nn.Linear``. lora_jax keeps the projections transposed
(``vera_a (max_in, r)``, ``vera_b (r, max_out)``) in the tree's shared
section. :func:`lora_jax.import_peft` and :func:`lora_jax.export_peft` call
these for a VeRA adapter. 2-D ``"io"`` kernels only (PEFT's VeRA adapts
``nn.Linear``).
"""

from __future__ import annotations

import json
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

from lora_jax.adapters._registry import SHARED
from lora_jax.adapters._tree import adapter_items, shared_section
from lora_jax.adapters._vera import VERA_A, VERA_B, VeraWeights
from lora_jax.errors._messages import expected
from lora_jax.io._files import as_path, replace_dir, returned, sibling
from lora_jax.io._peft_names import CONFIG, PREFIX, WEIGHTS, NameMap, module_name
from lora_jax.io._safetensors import read_tensors
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import flatten_with_paths, nest

_GLOBAL_A, _GLOBAL_B = "base_model.vera_A", "base_model.vera_B"


def is_vera(path: Any) -> bool:
    """Whether the PEFT adapter directory at ``path`` holds a VeRA adapter (``peft_type`` ``"VERA"``)."""
    file = as_path(path) / CONFIG
    try:
        return json.loads(file.read_text()).get("peft_type") == "VERA"
    except (OSError, ValueError, AttributeError):
        return False  # the LoRA reader reports what is wrong


def has_vera(lora: Any) -> bool:
    """Whether an adapter tree holds VeRA nodes."""
    return any(type(n) is VeraWeights for n in adapter_items(lora).values())


def import_vera(path: Any, params: Any, *, name_map: NameMap = None) -> tuple[dict[str, Any], LoraSpec]:
    """A PEFT VeRA adapter as ``(lora, spec)`` for ``params`` (every tensor must land; see the module docstring)."""
    path = as_path(path)
    config = json.loads((path / CONFIG).read_text())
    if not config.get("save_projection", True):
        raise ValueError(
            expected(
                f"{path / CONFIG}: save_projection",
                "true (the projections saved in the file)",
                config.get("save_projection"),
                "PEFT regenerates unsaved projections with torch's generator, which JAX cannot reproduce; save the "
                "adapter with VeraConfig(save_projection=True)",
            )
        )
    if config.get("bias", "none") != "none" or config.get("fan_in_fan_out") or config.get("modules_to_save"):
        raise ValueError(
            f"{path / CONFIG}: lora_jax imports VeRA adapters without bias, fan_in_fan_out or modules_to_save."
        )
    tensors = read_tensors((path / WEIGHTS).read_bytes(), path / WEIGHTS)
    if _GLOBAL_A not in tensors or _GLOBAL_B not in tensors:
        raise ValueError(f"{path / WEIGHTS}: a VeRA adapter without {_GLOBAL_A} / {_GLOBAL_B}.")
    shared = {VERA_A: jnp.asarray(tensors.pop(_GLOBAL_A).T), VERA_B: jnp.asarray(tensors.pop(_GLOBAL_B).T)}
    out, used = {}, set()
    for p, leaf in flatten_with_paths(params).items():
        if p.rpartition("/")[2] != "kernel" or len(getattr(leaf, "shape", ())) != 2:
            continue
        name = PREFIX + module_name(name_map, p)
        kd, kb = f"{name}.vera_lambda_d", f"{name}.vera_lambda_b"
        if kd not in tensors and kb not in tensors:
            continue
        d, b = tensors.get(kd), tensors.get(kb)
        if d is None or b is None or b.shape != (leaf.shape[1],) or d.shape != (int(config["r"]),):
            raise ValueError(
                expected(
                    f"{p}: {kd} / {kb}",
                    f"vera_lambda_d ({config['r']},) and vera_lambda_b ({leaf.shape[1]},) for a kernel {leaf.shape}",
                    f"{None if d is None else d.shape} and {None if b is None else b.shape}",
                    found_is_text=True,
                )
            )
        used |= {kd, kb}
        out[p] = VeraWeights(
            jnp.asarray(d), jnp.asarray(b), in_shape=(leaf.shape[0],), dropout=config.get("vera_dropout", 0.0)
        )
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ValueError(
            f"{path / WEIGHTS}: {len(unknown)} tensor(s) land on no kernel of params: {', '.join(unknown[:6])}."
        )
    tree = nest(dict(sorted(out.items())))
    tree[SHARED] = shared
    dtype = str(shared[VERA_A].dtype)
    spec = LoraSpec(
        rank=int(config["r"]),
        targets=[f"{p}" for p in sorted(out)],
        vera=True,
        vera_d_initial=float(config.get("d_initial", 0.1)),
        dropout=float(config.get("vera_dropout", 0.0)),
        dtype=dtype if dtype in ("float16", "bfloat16", "float32", "float64") else "float32",
    )
    return tree, spec


def export_vera(
    path: Any,
    lora: Any,
    spec: LoraSpec,
    *,
    name_map: NameMap = None,
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> Any:
    """Write a VeRA adapter tree in PEFT's format (``PeftModel.from_pretrained`` loads it)."""
    path = as_path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it.")
    shared = shared_section(lora)
    tensors = {
        _GLOBAL_A: np.ascontiguousarray(np.asarray(shared[VERA_A]).T),
        _GLOBAL_B: np.ascontiguousarray(np.asarray(shared[VERA_B]).T),
    }
    targets = []
    for p, node in adapter_items(lora).items():
        if type(node) is not VeraWeights or node.layout != "io":
            raise ValueError(
                expected(
                    f"export_peft(lora=...) at {p}",
                    "a VeraWeights node of a 2-D 'io' kernel (PEFT's VeRA adapts nn.Linear)",
                    node,
                )
            )
        name = module_name(name_map, p)
        targets.append(name)
        tensors[f"{PREFIX}{name}.vera_lambda_d"] = np.asarray(node.d)
        tensors[f"{PREFIX}{name}.vera_lambda_b"] = np.asarray(node.b)
    config = {
        "peft_type": "VERA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": int(shared[VERA_A].shape[1]),
        "target_modules": sorted(targets),
        "projection_prng_key": 0,
        "save_projection": True,
        "vera_dropout": spec.dropout,
        "d_initial": spec.vera_d_initial,
        "fan_in_fan_out": False,
        "bias": "none",
        "modules_to_save": None,
        "init_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    tmp = sibling(path, ".lora_jax-new")
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    (tmp / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    replace_dir(tmp, path, old=sibling(path, ".lora_jax-old"))
    return returned(path)
