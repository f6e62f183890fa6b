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
* a 2-D kernel stored ``(out, in)`` (``"oi"``, e.g. Hugging Face Flax's
  ``FlaxConv1D``, used as ``x @ kernel.T``) <-> ``nn.Linear(in, out)`` or
  transformers' ``Conv1D`` (weight ``(in, out)``; export with
  ``fan_in_fan_out=True``); ``lora_A (r, in)``, ``lora_B (out, r)`` either way.
  A 2-D kernel without a layout in ``LoraSpec(axes=...)`` is taken as
  ``"io"``: get ``(out, in)`` kernels' layouts from
  :func:`lora_jax.infer_axes`.
* embeddings ``(num, dim)`` <-> ``nn.Embedding``: ``lora_embedding_A (r, num)``,
  ``lora_embedding_B (dim, r)``.
* stacked-layer axes ``"b"``: one module per layer index (see
  :mod:`lora_jax.io._peft_names`).
* DoRA (:class:`lora_jax.DoraWeights`): ``m`` as ``lora_magnitude_vector``,
  ``(out_features,)`` (the output axes flattened like ``lora_B``), or
  ``(1, out, 1, 1)`` for a Conv2d, with ``use_dora: true`` in the config.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any

import jax
import numpy as np
from etils import epath

from lora_jax.adapters._dora import DoraWeights
from lora_jax.adapters._nodes import LoraWeights, Trainable
from lora_jax.adapters._tree import adapter_items, lowered_items
from lora_jax.io._describes import check_adapter_args, check_spec_describes
from lora_jax.io._files import NEW, OLD, as_path, check_replaceable, replace_dir, returned, sibling, sync_processes
from lora_jax.io._peft_convert import concatenated, doubled_config, initial_nodes
from lora_jax.io._peft_names import (
    CONFIG,
    EMBED_A,
    EMBED_B,
    LORA_A,
    LORA_B,
    MAGNITUDE,
    PREFIX,
    WEIGHTS,
    NameMap,
    expand,
    export_pattern_key,
    module_name,
)
from lora_jax.spec._spec import LoraSpec, changes_base, loftq_iters
from lora_jax.targets import _layout
from lora_jax.targets._select import _first, selector_matches


def to_host(x: Any) -> np.ndarray:
    """A full NumPy copy of ``x``, gathered across processes when it is not fully addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _check_conv(conv: Any) -> None:
    from lora_jax.errors._messages import expected

    ok = conv in ("auto", None) or isinstance(conv, str) or callable(conv)
    ok = ok or (isinstance(conv, (list, tuple)) and all(isinstance(c, str) for c in conv))
    if not ok:
        raise TypeError(
            expected(
                "export_peft(conv=...)",
                "'auto', None, a regex string, a list of names or a callable (path, leaf) -> bool",
                conv,
                "conv selects which kernels are convolutions, as LoraSpec(targets=...) does",
            )
        )


def _is_conv(conv: Any, path: str, layout: str) -> bool:
    core = layout.replace("b", "")
    if conv == "auto":
        return core == "iiio"
    if conv is None:
        return False
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


_PEFT_FLOATS = ("float16", "bfloat16", "float32", "float64")  # what PEFT (and import_peft) read back


def _host_float(x: Any, where: str) -> np.ndarray:
    """``to_host(x)``, refusing a dtype PEFT files do not hold (float8, integers)."""
    from lora_jax.errors._messages import expected

    name = np.dtype(x.dtype).name
    if name not in _PEFT_FLOATS:
        raise ValueError(
            expected(
                where,
                f"an array of a dtype PEFT reads ({', '.join(_PEFT_FLOATS)})",
                f"dtype {name}",
                "cast the adapter first, e.g. jax.tree.map(lambda x: x.astype(jnp.bfloat16), lora)",
                found_is_text=True,
            )
        )
    return to_host(x)


def _key_mapped(lora: Any, spec: LoraSpec, key_mapping: Any, name_map: NameMap, conv: Any) -> dict | None:
    """``{path: (HfTarget, ...)}`` of every node under ``key_mapping`` (None without one)."""
    if key_mapping is None:
        return None
    if name_map is not None:
        raise ValueError(
            "export_peft: pass name_map= or key_mapping=, not both (key_mapping gives every module's name)."
        )
    from lora_jax.io._key_mapping import resolve

    kernels, low = {}, lowered_items(lora)
    for p, node in adapter_items(lora).items():
        if type(node) is Trainable:
            shape = tuple(node.value.shape)
            if len(shape) == 1:
                layout = "o"
            else:
                layout = _first(spec.axes, p, "io" if len(shape) == 2 else None)
                if layout is None:
                    raise ValueError(
                        f"{p}: a leaf trained in full of shape {shape} needs its layout in LoraSpec(axes=...) to "
                        f"be exported through key_mapping."
                    )
            kernels[p] = (shape, layout, None)
        elif type(node) in (LoraWeights, DoraWeights):
            if _is_conv(conv, p, node.layout):
                raise ValueError(f"{p}: export_peft(key_mapping=...) writes Linear and Embedding modules, not convs.")
            kernels[p] = (low[p].kernel_shape, node.layout, node.kind)
    return resolve(key_mapping, kernels)


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else float(x)


def export_peft(
    path: str | os.PathLike,
    lora: Any,
    spec: LoraSpec,
    *,
    name_map: NameMap = None,
    conv: Any = "auto",
    task_type: str | None = None,
    base_model_name_or_path: str | None = None,
    fan_in_fan_out: bool = False,
    overwrite: bool = False,
    initial: Any = None,
    allocation: Any = None,
    key_mapping: Any = None,
) -> pathlib.Path | epath.Path:
    """Write an adapter in Hugging Face PEFT's format (``PeftModel.from_pretrained`` loads it).

    Sharded and not fully addressable arrays are gathered first; on several
    processes every process must call this (the gather is collective) and only
    process 0 writes. Files are written into a temporary sibling directory
    that is renamed into place, so a failed export leaves no partial adapter;
    with ``overwrite=True`` the previous adapter is renamed aside first and
    deleted last, so a failed export keeps it.

    On an object store (``gs://``, ``s3://``) there is no atomic rename: the
    new adapter is still written completely before the previous one is
    touched, then the previous one is moved to ``<path>.lora_jax-old`` and the
    new one to ``path``, each move a copy of both files followed by deleting
    the source, and the previous one is deleted last. A process killed during
    a move leaves ``path`` incomplete (``import_peft`` raises and names the
    sibling with a complete copy), never a mix of the two adapters.

    PEFT has no notion of a frozen A (LoRA-FA, ``LoraSpec(freeze_a=True)``):
    its A and B are written as ordinary ``lora_A``/``lora_B`` tensors, the
    outputs are the same, and :func:`lora_jax.import_peft` reads the files back
    as plain LoRA (A trains). To resume LoRA-FA training, keep the orbax
    checkpoint (:func:`lora_jax.save_adapter` records ``frozen``).

    An adapter trained on a residual base (``init="pissa"``/``"olora"``, from
    :func:`lora_jax.init_lora_and_base`) is exported for the ORIGINAL base
    with ``initial=`` its initial adapter: PEFT's
    ``path_initial_model_for_weight_conversion``, a plain LoRA of rank 2r
    (``A' = [A, A0]``, ``B' = [B; -B0]``, so ``s·A'B' = s·(AB - A0B0)``) with
    ``r`` doubled and ``lora_alpha`` doubled (times ``sqrt(2)`` with rsLoRA),
    as PEFT writes it. Without ``initial=`` such an adapter is written as
    PEFT's own ``save_pretrained`` writes it, with ``init_lora_weights``
    ``"pissa"``/``"olora"``: PEFT redoes the decomposition of the base it is
    loaded on (:func:`lora_jax.import_peft` refuses such files).

    Args:
      path: directory to create (holds ``adapter_config.json`` and
        ``adapter_model.safetensors``): a local path or a URI such as
        ``"gs://bucket/peft"`` (an ``etils.epath`` path).
      lora: the adapter tree.
      spec: its :class:`LoraSpec` (for ``r``, ``lora_alpha``, ``use_rslora``,
        ``lora_dropout``); per-module ranks and alphas that differ from it are
        written to ``rank_pattern`` / ``alpha_pattern``.
      name_map: parameter path -> torch module name: None (drop the leaf key,
        join keys with "."), a dict, or a callable; see
        :mod:`lora_jax.io._peft_names`.
      conv: which kernels are convolutions: ``"auto"`` (layout ``"iiio"``, a
        Conv2D), None, or a selector like ``LoraSpec(targets=...)``.
      task_type: PEFT's task type, written to the config: None or one of
        ``peft.TaskType``'s values (``"CAUSAL_LM"``, ``"SEQ_CLS"``,
        ``"SEQ_2_SEQ_LM"``, ``"TOKEN_CLS"``, ``"QUESTION_ANS"``,
        ``"FEATURE_EXTRACTION"``). ``AutoPeftModelForCausalLM.from_pretrained``
        and its siblings load the adapter only with their task type (and
        ``base_model_name_or_path``) set; ``PeftModel.from_pretrained`` then
        returns the task's class (``PeftModelForCausalLM``, ...).
      base_model_name_or_path: written to the config (a Hub model id or a
        local model directory): the model ``AutoPeftModel`` loads.
      fan_in_fan_out: PEFT's flag for torch modules that store their weight
        ``(in, out)``: True when the adapted torch modules are transformers'
        ``Conv1D`` (GPT-2 style), False for ``nn.Linear``. ``lora_A`` and
        ``lora_B`` are the same either way; PEFT reads the flag to merge.
      overwrite: replace an existing adapter directory: an empty directory
        or one whose top level holds only ``adapter_config.json`` and
        ``adapter_model.safetensors``; never a regular file or a directory
        holding anything else.
      initial: the adapter training started from (``init_lora_and_base``'s),
        to write the converted rank-2r LoRA for the original base; None
        writes ``lora`` as it is.
      allocation: AdaLoRA only (``LoraSpec(adalora=True)``): the allocator's
        ``AdaLoraState`` (its mask) or a :class:`lora_jax.AdaLoraAllocation`
        (mask, schedule, orth_reg_weight). The pruned triplets are dropped
        from the file and the kept ones listed in ``rank_pattern``, as PEFT's
        ``save_pretrained`` writes them; None writes every triplet and no
        ``rank_pattern`` (see :mod:`lora_jax.io._peft_adalora`).
      key_mapping: instead of ``name_map``, the model family's own Hugging
        Face key mapping ``{hf_key_regex: (jax_key, (permute, reshape))}``,
        e.g. tunix's ``llama3.params._get_key_and_transform_mapping(config)``
        (see :mod:`lora_jax.io._key_mapping`): each adapted kernel's torch
        module name comes from it, and A and B (and DoRA's ``m``) are put in
        the torch weight's element order by inverting its permute and reshape,
        so the adapter loads on the Hugging Face model the mapping converts
        from. Plain LoRA and DoRA nodes and leaves trained in full. A kernel
        the loader fuses from several torch weights (tunix Gemma's
        ``kv_einsum.w`` from ``k_proj`` and ``v_proj``) exports to each of
        them through entries for its components (``jax_key[c]``, made by
        :func:`lora_jax.fused_key_mapping`): with the component axis stacked
        (layout ``"b..."``, one adapter per component) each module gets its
        component's A and B; with it an output axis (``"o..."``, one shared
        adapter, qwix's) the shared A and B's slice; with it an input axis
        (``"i..."``) A's slice and the shared B. Either way the torch modules
        compute exactly the adapted fused kernel.

    Returns:
      The path written: an absolute ``pathlib.Path`` when local, an
      ``etils.epath.Path`` for a URI.

    Raises:
      ValueError: if a stacked kernel's module name does not place the layer
        index, two adapters map to one module name, or a leaf trained in full
        has no torch equivalent, or a kernel trained in full is exported with
        ``fan_in_fan_out=True`` (which weight layout its torch module has is unknown),
        or ``spec`` does not describe the adapter (another rank, alpha, rslora,
        dropout, freeze_a, layout, or targets that select other paths), or
        ``initial`` has LoRA nodes at other paths or with other shapes,
        layouts or scales than ``lora`` (the message names the path).
      FileExistsError: if ``path`` exists and ``overwrite`` is False, or is a
        file or a directory holding other files.

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
    from safetensors.numpy import save

    from lora_jax.io._peft_adalora import has_adalora
    from lora_jax.io._peft_vera import has_vera
    from lora_jax.spec._peft_config import check_base_model, check_task_type

    path = as_path(path, "export_peft(path=...)")
    check_adapter_args(lora, spec, "export_peft")
    task_type = check_task_type(task_type, "export_peft(task_type=...)")
    check_base_model(base_model_name_or_path, "export_peft(base_model_name_or_path=...)")
    if has_adalora(lora):  # AdaLoRA: its own format (lora_jax.io._peft_adalora)
        from lora_jax.io._peft_adalora import export_adalora

        return export_adalora(
            path,
            lora,
            spec,
            allocation=allocation,
            name_map=name_map,
            task_type=task_type,
            base_model_name_or_path=base_model_name_or_path,
            overwrite=overwrite,
        )
    if allocation is not None:
        raise ValueError(
            "export_peft(allocation=...) is AdaLoRA's mask and schedule, but the adapter has no AdaLoraWeights "
            "node; leave allocation out (or make the adapter with LoraSpec(adalora=True))."
        )
    if has_vera(lora):  # VeRA: its own format (lora_jax.io._peft_vera)
        from lora_jax.io._peft_vera import export_vera

        return export_vera(
            path,
            lora,
            spec,
            name_map=name_map,
            task_type=task_type,
            base_model_name_or_path=base_model_name_or_path,
            overwrite=overwrite,
        )
    _check_conv(conv)
    hf = _key_mapped(lora, spec, key_mapping, name_map, conv)
    loftq = loftq_iters(spec.init) is not None
    if loftq and initial is not None:
        raise ValueError(
            "export_peft(initial=...) with LoraSpec(init='loftq'): PEFT's rank-2r conversion rewrites an adapter for "
            "the original base only when base + initial adapter equals the original weights, and LoftQ's quantized "
            "base does not (that is its quantization error). Export without initial=: the adapter is for the "
            "LoftQ base (save it with save_adapter or lora_jax.quantize's format)."
        )
    first = {} if initial is None else initial_nodes(lora, initial)
    exists = path.exists()
    sync_processes(f"lora_jax.export_peft.check:{path}")  # every process checks before process 0 may write
    if exists and not overwrite:
        raise FileExistsError(f"{path} already exists; pass export_peft(..., overwrite=True) to replace it.")
    if exists:
        # PEFT's save_pretrained also writes a README.md; older PEFT wrote adapter_model.bin
        peft_files = frozenset({CONFIG, WEIGHTS, "README.md", "adapter_model.bin"})
        check_replaceable(path, peft_files, "export_peft(path=..., overwrite=True)", "a PEFT adapter")
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

    lowered_items(lora)  # every node whole (not a part of lora_jax.split) and consistent, before anything is written
    kinds_of_node = {type(n) for n in adapter_items(lora).values()} - {Trainable}
    if len(kinds_of_node) > 1:  # PEFT's config has one use_dora flag for all modules
        first_dora = next(p for p, n in adapter_items(lora).items() if type(n) is DoraWeights)
        raise ValueError(
            f"{first_dora}: export_peft writes one adapter_config.json with one use_dora flag, but this adapter "
            f"mixes DoRA (DoraWeights) and plain LoRA (LoraWeights) nodes. Export them as two adapters."
        )
    use_dora = DoraWeights in kinds_of_node
    if use_dora and initial is not None:
        raise ValueError(
            "export_peft(initial=...): PEFT's rank-2r conversion for PiSSA/OLoRA has no DoRA form; export a DoRA "
            "adapter without initial=."
        )
    for p, node in adapter_items(lora).items():
        if type(node) not in (LoraWeights, DoraWeights, Trainable):  # PEFT names per node type
            raise TypeError(
                f"{p}: export_peft has no PEFT codec for {type(node).__name__} nodes; it writes LoraWeights "
                f"(lora_A/lora_B), DoraWeights (plus lora_magnitude_vector) and Trainable (modules_to_save) "
                f"nodes. Merge this adapter instead, or export the other nodes alone."
            )
        if type(node) is Trainable:
            if fan_in_fan_out and p.rpartition("/")[2] == "kernel":
                raise ValueError(
                    f"{p}: a kernel trained in full is written as an nn.Linear weight (out, in), but "
                    f"fan_in_fan_out=True says the torch modules are Conv1D (in, out); which one this module is "
                    f"is unknown. Export it without fan_in_fan_out, or leave it out of LoraSpec(trainable=...)."
                )
            value = _host_float(node.value, f"export_peft(lora=...) at {p}")
            if hf is not None:  # the torch weight from the key mapping (one per component of a fused kernel)
                full = [(t.module, "weight", t.weight(value)) for t in hf[p]]
            else:
                name = module_name(name_map, p)
                full = [(name, *_trainable_tensor(p, value, spec, conv))]
            for name, key, value in full:
                claim(f"{name}.{key}", p)
                tensors[f"{PREFIX}{name}.{key}"] = value
                if name not in saved_modules:
                    saved_modules.append(name)
            continue
        layout = node.layout
        nb = layout.count("b")
        a, b = (_host_float(x, f"export_peft(lora=...) at {p}/{f}") for f, x in (("a", node.a), ("b", node.b)))
        mag = _host_float(node.m, f"export_peft(lora=...) at {p}/m") if type(node) is DoraWeights else None
        if first:  # PEFT's conversion for the original base: rank 2r, the same scale
            a0, b0 = (
                _host_float(x, f"export_peft(initial=...) at {p}/{f}")
                for f, x in (("a", first[p].a), ("b", first[p].b))
            )
            a, b = concatenated(a, b, a0, b0, nb)
        rank = a.shape[-1]
        if hf is not None:  # the torch weight's element order: one 2-D module, or one per fused component
            modules = [(t.module, *t.factors(a, b), None if mag is None else t.outputs(mag)) for t in hf[p]]
            layout = "io"
        else:
            names = expand(module_name(name_map, p), p, layout, a.shape[:nb])
            modules = [(n, a[i], b[i], None if mag is None else mag[i]) for i, n in names.items()]
        is_conv = _is_conv(conv, p, layout)
        # alpha from the static scale; 12 significant digits undo float rounding (7/sqrt(2)*sqrt(2) -> 7)
        alpha = float(f"{node.scale * (math.sqrt(rank) if spec.rslora else rank):.12g}")
        for name, ai, bi, mi in modules:
            claim(name, p)
            la, lb = _lora_tensors(ai, bi, layout.replace("b", ""), is_conv)
            ka, kb = (EMBED_A, EMBED_B) if node.kind == "embed" else (LORA_A, LORA_B)
            tensors[f"{PREFIX}{name}.{ka}"], tensors[f"{PREFIX}{name}.{kb}"] = la, lb
            if mi is not None:  # (out,), or (1, out, 1, ...) for a conv (PEFT's DoRA conv layer)
                mi = mi.reshape(-1)
                shape = (1, -1, *([1] * (a.ndim - nb - 2))) if is_conv else (-1,)
                tensors[f"{PREFIX}{name}.{MAGNITUDE}"] = np.ascontiguousarray(mi.reshape(shape))
            ranks[name], alphas[name] = rank, alpha
    check_spec_describes(lora, spec, "export_peft")  # r, lora_alpha and use_rslora are written from the spec
    targets = sorted(ranks)
    r_config, alpha_config = (
        (spec.rank, spec.alpha) if not first else doubled_config(spec.rank, spec.alpha, rslora=spec.rslora)
    )
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_config,
        "lora_alpha": _number(alpha_config),
        "target_modules": targets,
        "use_rslora": spec.rslora,
        "rank_pattern": {export_pattern_key(m, targets): r for m, r in ranks.items() if r != r_config},
        "alpha_pattern": {
            export_pattern_key(m, targets): _number(a)
            for m, a in alphas.items()
            if not math.isclose(a, alpha_config, rel_tol=1e-12)
        },
        "lora_dropout": spec.dropout,
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "modules_to_save": saved_modules or None,
        # a PiSSA/OLoRA adapter without initial= is for the residual base: PEFT redoes the init on loading. A LoftQ
        # adapter is for its quantized base (PEFT's "loftq" would need a loftq_config and redo LoftQ on loading)
        "init_lora_weights": spec.init if changes_base(spec.init) and not first and not loftq else True,
        "use_dora": use_dora,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }
    if jax.process_index() == 0:
        tmp = sibling(path, NEW)
        tmp.rmtree(missing_ok=True)  # left over from an interrupted export
        try:
            tmp.mkdir(parents=True)
            # bytes through epath (safetensors' own writer only knows local files)
            (tmp / WEIGHTS).write_bytes(save(tensors, metadata={"format": "pt"}))
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        except BaseException:
            tmp.rmtree(missing_ok=True)
            raise
        replace_dir(tmp, path, old=sibling(path, OLD))  # if this fails, the complete copies stay for the user
    sync_processes(f"lora_jax.export_peft:{path}")
    return returned(path)
