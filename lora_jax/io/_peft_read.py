"""Reading a PEFT adapter directory and checking its config: ``read_peft`` (the import is :mod:`lora_jax.io._peft_import`)."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np

from lora_jax.errors._messages import expected
from lora_jax.io._files import as_path, check_directory, interrupted_hint
from lora_jax.io._peft_names import (
    CONFIG,
    PREFIX,
    WEIGHTS,
)
from lora_jax.io._safetensors import read_tensors

# init_lora_weights values that leave the base weights as they were (PEFT's LoraLayer.update_layer): True
# (kaiming A, zero B), False (both random), "gaussian", "eva" (zero B), "orthogonal" (BA = 0), "mica" (zero A).
# The others ("pissa", "pissa_niter_N", "olora", "corda", "loftq", "lora_ga") subtract or quantize the base
# weights at init, so the saved adapter applies to that modified base only.
_BASE_UNCHANGED_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")


def _check_init(file: Any, config: dict[str, Any]) -> None:
    init = config.get("init_lora_weights", True)
    if any(init is ok or (isinstance(ok, str) and init == ok) for ok in _BASE_UNCHANGED_INITS):
        return
    raise ValueError(
        f"{file}: init_lora_weights={init!r}; lora_jax imports adapters for the unmodified base model, with "
        f"init_lora_weights one of {', '.join(map(repr, _BASE_UNCHANGED_INITS))}. PEFT's PiSSA/OLoRA/CorDA/LoRA-GA "
        f"inits subtract their initial product from the base weights and LoftQ quantizes them, so this adapter "
        f"only applies to that modified base and would give wrong outputs on the original one. Save it converted "
        f"to a plain LoRA of the original base: model.save_pretrained(out, "
        f"path_initial_model_for_weight_conversion=<the adapter saved right after init>) (rank doubles; the file "
        f"then says init_lora_weights=True), or merge it into the modified base in PEFT and load those weights."
    )


def _number(file: Any, key: str, value: Any, what: str, ok: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
        raise ValueError(expected(f"{file}: {key}", what, value, f"set {key} in the config to {what}"))
    return value


def config_values(file: Any, config: dict[str, Any]) -> dict[str, Any]:
    """The LoRA settings of a PEFT config, each checked and blamed on its own key.

    PEFT's defaults apply to absent keys (``r`` 8, ``lora_alpha`` 8,
    ``use_rslora`` False, ``lora_dropout`` 0); a key set to a wrong value,
    ``null`` included, raises naming the key.
    """
    out: dict[str, Any] = {}
    out["r"] = int(_number(file, "r", config.get("r", 8), "a positive integer rank", lambda v: v >= 1 and v == int(v)))
    out["lora_alpha"] = float(
        _number(file, "lora_alpha", config.get("lora_alpha", 8), "a positive number (PEFT's alpha)", lambda v: v > 0)
    )
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(
            expected(f"{file}: use_rslora", "true or false (a JSON bool)", rslora, "write use_rslora: false or true")
        )
    out["use_rslora"] = rslora
    dropout = config.get("lora_dropout") or 0.0
    out["lora_dropout"] = float(_number(file, "lora_dropout", dropout, "a number in [0, 1)", lambda v: 0 <= v < 1))
    for key, what, ok in (
        ("rank_pattern", "a positive integer rank", lambda v: v >= 1 and v == int(v)),
        ("alpha_pattern", "a positive number", lambda v: v > 0),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise ValueError(expected(f"{file}: {key}", "an object {module pattern: value}", pattern))
        out[key] = {k: _number(file, f"{key}[{k!r}]", v, what, ok) for k, v in pattern.items()}
    saved = config.get("modules_to_save") or []
    if not isinstance(saved, list) or not all(isinstance(m, str) for m in saved):
        raise ValueError(expected(f"{file}: modules_to_save", "a list of module names, or null", saved))
    out["modules_to_save"] = saved
    return out


def read_peft(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The config dict and tensors (without the ``base_model.model.`` prefix) of a PEFT adapter.

    ``path`` is a local directory or a URI (``"gs://bucket/peft"``, read through ``etils.epath``).
    """
    path = as_path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such PEFT adapter directory.{interrupted_hint(path)}")
    check_directory(path, f"{path}", f"a PEFT adapter directory (holding {CONFIG} and {WEIGHTS})")
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise ValueError(
            f"{path}: not a PEFT adapter (expected {CONFIG} and {WEIGHTS} inside).{interrupted_hint(path)}"
        )
    try:
        config = json.loads((path / CONFIG).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path / CONFIG}: not valid JSON ({e}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path / CONFIG}: peft_type is {found!r}; only LORA adapters can be imported.")
    unsupported = {
        "use_dora": (False, True, None),
        "bias": ("none", None),
        "lora_bias": (False, None),
        "layer_replication": (None,),
        "target_parameters": (None, []),
        "trainable_token_indices": (None,),
        "alora_invocation_tokens": (None,),  # activated LoRA: the adapter acts only after these tokens
    }
    for key, ok in unsupported.items():
        if key in config and config[key] not in ok:
            raise ValueError(
                expected(
                    f"{path / CONFIG}: {key}",
                    f"{' or '.join(json.dumps(v) for v in ok)} (a plain LoRA adapter)",
                    config[key],
                    "lora_jax imports plain LoRA adapters; "
                    + (
                        "an activated LoRA (aLoRA) applies only after its invocation tokens, which apply_lora cannot "
                        "do: importing it as plain LoRA would change every token"
                        if key == "alora_invocation_tokens"
                        else f"{key} is not supported by lora_jax's importer"
                    ),
                )
            )
    _check_init(path / CONFIG, config)
    config_values(path / CONFIG, config)
    try:
        data = (path / WEIGHTS).read_bytes()
    except OSError as e:
        raise ValueError(
            f"{path / WEIGHTS}: cannot read the tensors, the file is corrupt or truncated ({e})."
        ) from None
    raw = read_tensors(data, path / WEIGHTS)
    tensors = {}
    for k, v in raw.items():
        if not k.startswith(PREFIX):
            raise ValueError(f"{path / WEIGHTS}: key {k!r} lacks PEFT's {PREFIX!r} prefix; not a PEFT LoRA file.")
        tensors[k[len(PREFIX) :]] = v
    return config, tensors
