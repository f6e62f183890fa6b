"""PEFT's ``LoraConfig`` <-> :class:`LoraSpec`: ``LoraSpec.from_peft`` and ``LoraSpec.to_peft``.

The options, PEFT's name first:

* ``r`` / ``rank``, ``lora_alpha`` / ``alpha``, ``use_rslora`` / ``rslora``,
  ``lora_dropout`` / ``dropout``, ``use_dora`` / ``dora``, ``rank_pattern``,
  ``alpha_pattern``;
* ``target_modules`` / ``targets``, ``exclude_modules`` / ``exclude``,
  ``modules_to_save`` / ``trainable``: a list (a set to PEFT) is sorted, a
  regex string kept, with
  ``target_match="peft"`` so they match module names as PEFT does (see
  :func:`lora_jax.targets._select.peft_selector_matches`; a module name is the
  parameter path without its leaf key, "/" read as ".");
* ``init_lora_weights``: True / ``"kaiming"``, False / ``"random"``,
  ``"gaussian"``, ``"orthogonal"``, ``"pissa"``, ``"pissa_niter_N"``,
  ``"olora"``, and ``"loftq"`` with ``loftq_config={"loftq_bits": 4,
  "loftq_iter": N}`` / ``"loftq"`` (N = 1) or ``"loftq_iter_N"``;
* ``fan_in_fan_out`` says how the torch modules store their weights; a JAX
  kernel's layout is ``LoraSpec(axes=...)``, so it is accepted either way and
  not kept (``export_peft(fan_in_fan_out=...)`` writes it);
* ``task_type``, ``base_model_name_or_path``, ``revision``,
  ``inference_mode``, ``peft_version``, ``auto_mapping``: about the torch
  model, not the adapter; not kept (``to_peft`` and ``export_peft`` take
  ``task_type`` and ``base_model_name_or_path``).

lora_jax's own fields have no PEFT option: ``axes``, ``dtype`` and
``freeze_a`` are given to ``from_peft`` as keywords and are left out by
``to_peft``. VeRA and AdaLoRA specs are other PEFT configs (``export_peft``
writes them). Everything else PEFT 0.21 has (``bias``, ``layers_to_transform``,
``eva``/``corda``/``lora_ga``/``mica`` inits, ``use_qalora``, ``megatron_config``,
...) is refused when set, naming the option.
"""

from __future__ import annotations

import json
import os
from typing import Any

from lora_jax.errors._messages import expected
from lora_jax.spec._spec import LoraSpec, loftq_iters, pissa_niter

#: ``peft.TaskType``'s values in PEFT 0.21 (``AutoPeftModel`` picks the model class by it).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
#: The LoraSpec fields PEFT has no option for, given to ``from_peft`` as keywords.
LORA_JAX_FIELDS = ("axes", "dtype", "freeze_a")
_INITS_FROM_PEFT = {"gaussian": "gaussian", "orthogonal": "orthogonal", "pissa": "pissa", "olora": "olora"}
_INITS_TO_PEFT = {"kaiming": True, "random": False, **{v: k for k, v in _INITS_FROM_PEFT.items()}}
# options that do not change the adapter lora_jax builds
_METADATA = (
    "task_type",
    "peft_type",
    "auto_mapping",
    "peft_version",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "runtime_config",
    "megatron_core",
    "qalora_group_size",
    "fan_in_fan_out",
    "eva_config",  # each used only with its init_lora_weights, which is refused; PEFT ignores them otherwise
    "corda_config",
    "lora_ga_config",
    "loftq_config",  # read with init_lora_weights="loftq"
)
_MAPPED = (
    "r",
    "lora_alpha",
    "lora_dropout",
    "use_rslora",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "use_dora",
)
_LAYERS_HINT = (
    "write the layers into target_modules as a regex over module names instead, e.g. "
    r"target_modules=r'.*\.layers\.(0|1)\.self_attn\.(q_proj|v_proj)'"
)
# option -> (the values lora_jax supports, why / what to do instead)
_UNSUPPORTED = {
    "bias": (("none",), "lora_jax trains no biases as part of LoRA; train them in full with LoraSpec(trainable=...)"),
    "lora_bias": ((False,), "lora_jax's B has no bias term"),
    "layers_to_transform": ((None, []), _LAYERS_HINT),
    "layers_pattern": ((None, [], ""), _LAYERS_HINT),
    "megatron_config": ((None, {}), "lora_jax shards adapters with jax.sharding (lora_jax.adapter_shardings)"),
    "trainable_token_indices": ((None, [], {}), "train the embedding in full with LoraSpec(trainable=...)"),
    "alora_invocation_tokens": ((None,), "activated LoRA applies after invocation tokens only, which lora_jax cannot"),
    "use_qalora": ((False,), "QA-LoRA pools the input by groups; lora_jax has plain (Q)LoRA"),
    "velora_config": ((None,), "VeLoRA is a PEFT LoRA variant lora_jax does not implement"),
    "monteclora_config": ((None,), "MonteCLoRA is a PEFT LoRA variant lora_jax does not implement"),
    "use_bdlora": ((None,), "block-diagonal LoRA is a PEFT LoRA variant lora_jax does not implement"),
    "arrow_config": ((None,), "Arrow routing is a PEFT LoRA variant lora_jax does not implement"),
    "kasa_config": ((None,), "KaSA is a PEFT LoRA variant lora_jax does not implement"),
    "layer_replication": ((None, []), "lora_jax does not duplicate layers"),
    "target_parameters": ((None, []), "target the kernel with target_modules (lora_jax adapts kernels of any shape)"),
    "ensure_weight_tying": ((False,), "lora_jax does not tie adapters across modules"),
}
_DATA_INITS = {
    "eva": "EVA initializes from activations of training data",
    "corda": "CorDA initializes from activation covariances of training data",
    "lora_ga": "LoRA-GA initializes from gradients of training data",
    "mica": "MiCA freezes B at the base's smallest singular vectors, which lora_jax does not do",
}


def check_task_type(task_type: Any, where: str) -> str | None:
    """``task_type`` as PEFT's string (a ``peft.TaskType`` member too), or None; anything else raises.

    >>> check_task_type("CAUSAL_LM", "f(task_type=...)"), check_task_type(None, "f(task_type=...)")
    ('CAUSAL_LM', None)
    """
    if task_type is None:
        return None
    value = getattr(task_type, "value", task_type)  # peft.TaskType is a str Enum
    if isinstance(value, str) and value in TASK_TYPES:
        return value
    near = [t for t in TASK_TYPES if isinstance(value, str) and t == value.upper()]
    raise ValueError(
        expected(
            where,
            f"None or one of peft.TaskType's values ({', '.join(map(repr, TASK_TYPES))})",
            task_type,
            f"Did you mean {near[0]!r}?" if near else "E.g. task_type='CAUSAL_LM' for AutoPeftModelForCausalLM",
        )
    )


def check_base_model(name: Any, where: str) -> None:
    """``base_model_name_or_path`` is a str (a Hub id or a local directory) or None."""
    if name is not None and not isinstance(name, str):
        raise TypeError(
            expected(where, "None or a str: a Hub model id or a local model directory", name, "e.g. str(path)")
        )


def _read(config: Any) -> tuple[str, dict[str, Any]]:
    """``(where, the config as a dict)`` from a path, a dict or a ``peft.LoraConfig``."""
    if isinstance(config, dict):
        return "LoraSpec.from_peft(config)", dict(config)
    if isinstance(config, (str, os.PathLike)):
        from lora_jax.io._files import as_path
        from lora_jax.io._peft_names import CONFIG

        path = as_path(config, "LoraSpec.from_peft(config=...)")
        file = path / CONFIG if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such file; pass an adapter_config.json or the directory holding it.")
        try:
            data = json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{file}: not valid JSON ({e}).") from None
        if not isinstance(data, dict):
            raise ValueError(expected(f"{file}", "a JSON object (a PEFT adapter config)", data))
        return str(file), data
    if hasattr(config, "to_dict") and hasattr(config, "peft_type"):  # a peft config object: no import of peft needed
        return f"LoraSpec.from_peft({type(config).__name__})", dict(config.to_dict())
    raise TypeError(
        expected(
            "LoraSpec.from_peft(config=...)",
            "an adapter_config.json path (or its directory), a dict, or a peft.LoraConfig",
            config,
        )
    )


def _names(where: str, key: str, value: Any, *, regex_ok: bool) -> Any:
    """A PEFT module-name option as LoraSpec holds it: sorted names (PEFT holds a set), a regex string, or None."""
    if value is None:
        return None
    if isinstance(value, str) and regex_ok:
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(set(value)) or None
    what = "a list of module names or a regex string" if regex_ok else "a list of module names"
    raise ValueError(expected(f"{where}: {key}", f"{what}, or null", value))


def _init(where: str, config: dict[str, Any]) -> str:
    init = config.get("init_lora_weights", True)
    if init is True or init is False:
        return "kaiming" if init else "random"
    if isinstance(init, str) and init in _INITS_FROM_PEFT:
        return _INITS_FROM_PEFT[init]
    if isinstance(init, str) and pissa_niter(init) is not None:
        return init
    if init == "loftq":
        loftq = config.get("loftq_config") or {}
        if not isinstance(loftq, dict):
            loftq = vars(loftq)  # a peft.LoftQConfig
        bits, iters = loftq.get("loftq_bits", 4), loftq.get("loftq_iter", 1)
        if bits != 4:
            raise ValueError(
                expected(
                    f"{where}: loftq_config['loftq_bits']",
                    "4 (lora_jax's LoftQ quantizes the base to NF4, as QLoRA)",
                    bits,
                    "Set loftq_bits=4",
                )
            )
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(expected(f"{where}: loftq_config['loftq_iter']", "a positive integer", iters))
        return "loftq" if iters == 1 else f"loftq_iter_{iters}"
    if isinstance(init, str) and init in _DATA_INITS:
        why = _DATA_INITS[init]
    else:
        why = "it is not one of PEFT's inits lora_jax knows"
    raise ValueError(
        expected(
            f"{where}: init_lora_weights",
            "true, false, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_N', 'olora' or 'loftq'",
            init,
            f"{why}. Use init_lora_weights=true (lora_jax's 'kaiming'), or initialize in PEFT and read the saved "
            f"adapter with lora_jax.import_peft",
        )
    )


def _check_supported(where: str, config: dict[str, Any]) -> None:
    peft_type = getattr(config.get("peft_type", "LORA"), "value", config.get("peft_type", "LORA"))
    if peft_type not in ("LORA", None):
        raise ValueError(
            expected(
                f"{where}: peft_type",
                "'LORA' (a LoraConfig)",
                peft_type,
                "lora_jax's VeRA and AdaLoRA are LoraSpec(vera=True) / LoraSpec(adalora=True), written by hand; "
                "import a saved VeRA adapter with lora_jax.import_peft",
            )
        )
    for key, (ok, why) in _UNSUPPORTED.items():
        value = config.get(key, ok[0])
        if not any(value is v or (type(value) is type(v) and value == v) for v in ok):
            raise ValueError(
                expected(
                    f"{where}: {key}",
                    f"{' or '.join(json.dumps(v) for v in ok)} (lora_jax does not support {key})",
                    value,
                    why,
                )
            )
    unknown = [
        k
        for k, v in config.items()
        if k not in (*_METADATA, *_MAPPED, *_UNSUPPORTED) and not (v is None or v is False or v in ("", [], {}))
    ]
    if unknown:
        raise ValueError(
            expected(
                f"{where}: {unknown[0]}",
                "only options of PEFT 0.21's LoraConfig",
                f"{unknown[0]}={config[unknown[0]]!r}",
                "a newer PEFT option or a typo; lora_jax cannot tell whether it changes the adapter",
                found_is_text=True,
            )
        )


def spec_from_peft(config: Any, **lora_jax_fields: Any) -> LoraSpec:
    """The :class:`LoraSpec` of a PEFT LoRA config (see :meth:`LoraSpec.from_peft`).

    Args:
      config: an ``adapter_config.json`` path or the directory holding it (a
        URI too), a dict (``LoraConfig.to_dict()``, the parsed json), or a
        ``peft.LoraConfig`` (read through its ``to_dict``; peft is never imported here).
      **lora_jax_fields: ``axes``, ``dtype``, ``freeze_a``: the fields PEFT has no option for.

    Raises:
      ValueError: naming the option, for options lora_jax does not support or
        bad values; TypeError: for another kind of ``config`` or keyword.

    Example:
      >>> spec = spec_from_peft({"r": 8, "lora_alpha": 16, "target_modules": "all-linear", "use_rslora": True})
      >>> spec.rank, spec.alpha, spec.targets, spec.rslora, spec.init
      (8, 16.0, 'all-linear', True, 'kaiming')
    """
    extra = [k for k in lora_jax_fields if k not in LORA_JAX_FIELDS]
    if extra:
        raise TypeError(
            expected(
                f"LoraSpec.from_peft(..., {extra[0]}=...)",
                f"only the fields PEFT has no option for ({', '.join(LORA_JAX_FIELDS)})",
                f"{extra[0]}",
                "the others come from the PEFT config (e.g. rank from r); change them after with spec.replace(...)",
                found_is_text=True,
            )
        )
    where, data = _read(config)
    _check_supported(where, data)
    from lora_jax.io._peft_read import config_values

    values = config_values(where, data)
    targets = _names(where, "target_modules", data.get("target_modules"), regex_ok=True)
    if targets is None:
        raise ValueError(
            expected(
                f"{where}: target_modules",
                "the module names to adapt (a list or a regex string) or 'all-linear'",
                data.get("target_modules"),
                "PEFT picks defaults per architecture, which lora_jax does not know; set them, e.g. "
                "target_modules=['q_proj', 'v_proj']",
            )
        )
    dora = data.get("use_dora", False)
    if not isinstance(dora, bool):
        raise ValueError(expected(f"{where}: use_dora", "true or false", dora))
    return LoraSpec(
        rank=values["r"],
        alpha=values["lora_alpha"],
        targets=targets,
        exclude=_names(where, "exclude_modules", data.get("exclude_modules"), regex_ok=True),
        trainable=_names(where, "modules_to_save", data.get("modules_to_save"), regex_ok=False),
        rank_pattern={k: int(v) for k, v in values["rank_pattern"].items()},
        alpha_pattern=values["alpha_pattern"],
        rslora=values["use_rslora"],
        init=_init(where, data),
        dropout=values["lora_dropout"],
        dora=dora,
        target_match="peft",
        **lora_jax_fields,
    )


def _number(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


def _peft_names(spec: LoraSpec, field: str) -> Any:
    value = getattr(spec, field)
    if callable(value):
        raise ValueError(
            expected(
                f"LoraSpec({field}=<callable>).to_peft()",
                "module names (a list) or a regex string",
                "a function, which PEFT cannot read",
                f"write {field} as names with target_match='peft', e.g. {field}=['q_proj', 'v_proj']",
                found_is_text=True,
            )
        )
    return list(value) if isinstance(value, tuple) else value


def spec_to_peft(
    spec: LoraSpec, *, task_type: str | None = None, base_model_name_or_path: str | None = None
) -> dict[str, Any]:
    """The keyword arguments of ``peft.LoraConfig`` for ``spec`` (see :meth:`LoraSpec.to_peft`).

    ``spec_from_peft(spec_to_peft(spec), axes=spec.axes, dtype=spec.dtype,
    freeze_a=spec.freeze_a) == spec`` when its name lists are sorted (PEFT
    holds them as sets; ``from_peft`` sorts them). PEFT's ``save_pretrained``
    sorts the keys of ``rank_pattern`` and ``alpha_pattern`` too, so a PEFT
    model reloaded from it takes the alphabetically first matching key, not the
    first written. The dict is also a valid
    ``adapter_config.json`` (``json.dump`` it).

    Raises:
      ValueError: for a VeRA or AdaLoRA spec (other PEFT configs), a callable
        selector, or selectors matched by lora_jax's rules (``target_match=
        "lora_jax"``), which PEFT would read differently, except ``"all-linear"``
        alone; a bad ``task_type``.

    Example:
      >>> d = spec_to_peft(LoraSpec(rank=4, targets="all-linear", init="loftq_iter_2"), task_type="CAUSAL_LM")
      >>> d["task_type"], d["target_modules"], d["init_lora_weights"], d["loftq_config"]
      ('CAUSAL_LM', 'all-linear', 'loftq', {'loftq_bits': 4, 'loftq_iter': 2})
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(expected("spec_to_peft(spec=...)", "a LoraSpec", spec))
    for name in ("vera", "adalora"):
        if getattr(spec, name):
            raise ValueError(
                expected(
                    "LoraSpec.to_peft()",
                    "a LoRA or DoRA spec (peft.LoraConfig)",
                    f"{name}=True, which is PEFT's {'VeraConfig' if name == 'vera' else 'AdaLoraConfig'}",
                    "export the trained adapter with lora_jax.export_peft, which writes that config",
                    found_is_text=True,
                )
            )
    lora_jax_rules = spec.target_match == "lora_jax"
    selectors = [n for n in ("exclude", "trainable", "rank_pattern", "alpha_pattern") if getattr(spec, n)]
    if lora_jax_rules and (spec.targets != "all-linear" or selectors):
        what = f"targets={spec.targets!r}" if spec.targets != "all-linear" else selectors[0]
        raise ValueError(
            expected(
                "LoraSpec.to_peft()",
                "a spec whose targets match by PEFT's rules (target_match='peft')",
                f"{what} matched by lora_jax's rules (a name equals any key on the path, a regex full-matches the "
                f"path), which PEFT reads as module-name suffixes",
                "write the spec with target_match='peft' (spec.replace(target_match='peft') if its names are module "
                "names, e.g. ['q_proj', 'v_proj']), or export the adapter with lora_jax.export_peft, which writes the "
                "module names the spec selected",
                found_is_text=True,
            )
        )
    check_base_model(base_model_name_or_path, "LoraSpec.to_peft(base_model_name_or_path=...)")
    iters = loftq_iters(spec.init)
    out: dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": check_task_type(task_type, "LoraSpec.to_peft(task_type=...)"),
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": _number(spec.alpha),
        "target_modules": _peft_names(spec, "targets"),
        "exclude_modules": _peft_names(spec, "exclude"),
        "modules_to_save": _peft_names(spec, "trainable"),
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "use_dora": spec.dora,
        "rank_pattern": dict(spec.rank_pattern),
        "alpha_pattern": {k: _number(v) for k, v in spec.alpha_pattern},
        "init_lora_weights": "loftq" if iters is not None else _INITS_TO_PEFT.get(spec.init, spec.init),
        "bias": "none",
    }
    if iters is not None:
        out["loftq_config"] = {"loftq_bits": 4, "loftq_iter": iters}
    return out
