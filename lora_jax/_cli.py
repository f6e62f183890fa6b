"""The command line: ``python -m lora_jax {inspect,convert,diagnose,demo}``.

* ``inspect PATH`` prints the summary table of an adapter: an orbax checkpoint
  (:func:`lora_jax.save_adapter`, or a ``CheckpointManager`` step directory)
  or a PEFT adapter directory. Only the adapter is read; no base weights.
  Paths may be URIs (``gs://bucket/run/adapter``), read through ``etils.epath``.
* ``convert SRC DST`` converts orbax <-> PEFT (the format of ``SRC`` is
  detected, ``DST`` gets the other). PEFT -> orbax reads the kernels from the
  file: 2-D ``"io"`` kernels at ``module/path/kernel`` (embeddings at
  ``.../embedding``, 4-D Conv2D kernels ``"iiio"``). For multi-axis or stacked
  kernels use :func:`lora_jax.import_peft` with your params and ``name_map``.
* ``diagnose PATH [--params FILE] [--png OUT]`` prints :func:`lora_jax.diagnose`'s
  table for a saved adapter (orbax or PEFT). ``--params`` is the base: an
  orbax checkpoint of the params tree, or a safetensors file whose tensors are
  named by parameter path (``dense/kernel``) or as torch names them
  (``dense.weight``, any layout: only ``||W||_F`` is read, which no transpose
  or reshape changes). Without it, everything but the norm ratio.
* ``demo ...`` runs :func:`lora_jax.demo.main`.

Errors print one line on stderr and exit with status 1 (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from etils import epath

ORBAX, PEFT = "orbax", "peft"


def _path_arg(arg: str) -> epath.Path:
    """A command-line path: a URI (``gs://...``) keeps its scheme, a local path becomes absolute."""
    from lora_jax.io._files import as_path

    return as_path(arg)


def detect_format(path: epath.Path) -> str:
    """``"orbax"`` or ``"peft"``: which adapter format the directory holds."""
    from lora_jax.io._orbax import META
    from lora_jax.io._peft_import import CONFIG

    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory; an adapter is an orbax checkpoint or a PEFT adapter directory")
    if (path / META).is_dir():
        return ORBAX
    if (path / CONFIG).is_file():
        return PEFT
    raise ValueError(
        f"{path}: neither an orbax adapter checkpoint (no {META}/) nor a PEFT adapter (no {CONFIG}); "
        f"for a CheckpointManager directory pass one step, e.g. {path / '<step>'}"
    )


def _abstract_lora(path: epath.Path, fmt: str) -> tuple[Any, str]:
    """An adapter tree of ShapeDtypeStructs (no arrays read for orbax) and a description line."""
    from lora_jax.io._codec import abstract_tree
    from lora_jax.io._orbax_load import read_adapter_meta

    if fmt == ORBAX:
        meta = read_adapter_meta(path)
        try:
            lora = abstract_tree(meta["adapters"], meta.get("shared", {}))  # the shared section included
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        s = meta["spec"]
        desc = f"orbax adapter checkpoint {path}: rank={s['rank']} alpha={s['alpha']:g} rslora={s['rslora']}"
        return lora, desc
    from lora_jax.io._peft_import import import_peft
    from lora_jax.io._peft_read import read_peft

    config, _ = read_peft(path)
    lora, spec = import_peft(path)
    desc = (
        f"PEFT adapter {path}: r={spec.rank} lora_alpha={spec.alpha:g} use_rslora={spec.rslora} "
        f"base_model={config.get('base_model_name_or_path')} (paths: torch module names joined with '/', 2-D 'io' view)"
    )
    return lora, desc


def inspect(path: epath.Path) -> str:
    """The text ``inspect`` prints: a description line and the summary table."""
    from lora_jax.transforms._summary import summary

    lora, desc = _abstract_lora(path, detect_format(path))
    s = summary({}, lora)
    lines = str(s).splitlines()[:-1]  # the footer's totals need base params, which an adapter does not hold
    counts = f"{s.trainable_params:,}" + (f" trainable + {s.frozen_params:,} frozen" if s.frozen_params else "")
    footer = (
        f"adapter params: {counts} || adapter bytes: {s.trainable_bytes:,} || "
        f"base params: not stored in an adapter (lora_jax.summary(params, lora) gives totals)"
    )
    return "\n".join([desc, *lines, footer])


def convert(src: epath.Path, dst: epath.Path, *, name_map: dict | None, overwrite: bool) -> str:
    """Convert ``src`` to the other format at ``dst``; returns a one-line report."""
    from lora_jax.errors._messages import expected
    from lora_jax.io._orbax import save_adapter
    from lora_jax.io._orbax_load import load_adapter
    from lora_jax.io._peft_export import export_peft
    from lora_jax.io._peft_import import import_peft

    fmt = detect_format(src)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
    if str(dst) == str(src):
        raise ValueError(
            expected(
                "convert SRC DST",
                "a DST other than SRC (the other format is written to DST)",
                f"DST = SRC = {src}",
                "write to a new path, e.g. convert SRC SRC-peft",
                found_is_text=True,
            )
        )
    if fmt == ORBAX:
        lora, spec = load_adapter(src)
        export_peft(dst, lora, spec, name_map=name_map, overwrite=overwrite)
        return f"wrote PEFT adapter {dst} from orbax checkpoint {src}"
    if name_map is not None:
        raise ValueError("--name-map applies to orbax -> PEFT; PEFT -> orbax keeps the torch module names as paths")
    lora, spec = import_peft(src)
    save_adapter(dst, lora, spec, overwrite=overwrite)
    return f"wrote orbax checkpoint {dst} from PEFT adapter {src} (kernels as 2-D 'io' at module/path/kernel)"


def _load_lora(path: epath.Path) -> Any:
    from lora_jax.io._orbax_load import load_adapter
    from lora_jax.io._peft_import import import_peft

    return (load_adapter if detect_format(path) == ORBAX else import_peft)(path)[0]


def _base_for(lora: Any, file: epath.Path) -> dict[str, Any]:
    """``{adapter path: base kernel}`` read from an orbax params checkpoint or a safetensors file."""
    import numpy as np

    from lora_jax.adapters._lowered import LowRank
    from lora_jax.adapters._tree import lowered_items
    from lora_jax.targets._paths import flatten_with_paths

    if file.is_dir():
        import orbax.checkpoint as ocp

        tensors = flatten_with_paths(ocp.StandardCheckpointer().restore(file))
    else:
        from lora_jax.io._safetensors import read_tensors

        tensors = read_tensors(file.read_bytes(), file)
    out = {}
    for path, low in lowered_items(lora).items():
        if not isinstance(low, LowRank):  # a leaf trained in full: diagnose leaves it out
            continue
        names = [path, path.replace("/", "."), path.rsplit("/", 1)[0].replace("/", ".") + ".weight"]
        found = next((n for n in names if n in tensors), None)
        if found is None:
            raise KeyError(f"--params {file}: no tensor for {path} (looked for {', '.join(names)})")
        w = np.asarray(tensors[found])
        if w.size != int(np.prod(low.kernel_shape)):
            raise ValueError(
                f"--params {file}: {found} has shape {w.shape}, but the adapter at {path} fits a kernel of "
                f"shape {low.kernel_shape}: not the base this adapter was made for"
            )
        out[path] = w.reshape(low.kernel_shape)  # only its Frobenius norm is read
    return out


def diagnose_command(path: epath.Path, params: epath.Path | None, png: epath.Path | None) -> str:
    """The text ``diagnose`` prints (and the PNG it writes)."""
    from lora_jax.targets._paths import nest
    from lora_jax.transforms._diagnose import diagnose
    from lora_jax.transforms._diagnose_report import diagnosis_table, plot_diagnosis

    lora = _load_lora(path)
    base = nest(_base_for(lora, params)) if params is not None else None
    report = diagnose(base, lora)
    text = diagnosis_table(report)
    if png is not None:
        text += f"\nwrote {plot_diagnosis(png, report, title=str(path))}"
    if params is None:
        text += "\n(no --params: norm ratios need the base weights)"
    return text


def _demo(argv: list[str]) -> int:
    try:
        import lora_jax.demo as demo
    except ModuleNotFoundError as e:
        if e.name not in ("lora_jax.demo",):
            raise
        print(
            "lora_jax demo: error: the demo is not available in this installation (no lora_jax.demo)", file=sys.stderr
        )
        return 2
    return int(demo.main(argv) or 0)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lora_jax", description="LoRA adapters for JAX: inspect, convert, diagnose."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="print the summary table of an orbax or PEFT adapter")
    p.add_argument("path", type=_path_arg)
    p = sub.add_parser("convert", help="convert an adapter orbax <-> PEFT (format of SRC detected)")
    p.add_argument("src", type=_path_arg)
    p.add_argument("dst", type=_path_arg)
    p.add_argument("--name-map", type=_path_arg, help="JSON file {param path: torch module name} (orbax -> PEFT)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p = sub.add_parser("diagnose", help="norm ratio, spectrum and effective rank of a saved adapter's kernels")
    p.add_argument("path", type=_path_arg)
    p.add_argument("--params", type=_path_arg, help="the base: an orbax params checkpoint or a safetensors file")
    p.add_argument("--png", type=_path_arg, help="also write the per-kernel plots to this PNG")
    p = sub.add_parser("demo", help="run the demo (arguments are passed on)", add_help=False)
    p.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status.

    Example:
      >>> main(["inspect", "/nonexistent"])
      1
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # everything after "demo" belongs to the demo's own parser
        return _demo(argv[1:])
    args = _parser().parse_args(argv)
    try:
        if args.command == "inspect":
            print(inspect(args.path))
        elif args.command == "diagnose":
            print(diagnose_command(args.path, args.params, args.png))
        else:
            name_map = None
            if args.name_map is not None:
                try:
                    name_map = json.loads(args.name_map.read_text())
                except (OSError, json.JSONDecodeError) as e:
                    raise ValueError(f"--name-map {args.name_map}: cannot read a JSON object ({e})") from None
            print(convert(args.src, args.dst, name_map=name_map, overwrite=args.overwrite))
    except (OSError, ValueError, TypeError, KeyError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"lora_jax {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0
