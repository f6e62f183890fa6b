"""Misuse cases for the files: save_adapter, load_adapter, adapter_checkpoint_args, read_adapter_meta,
export_peft, import_peft, default_name_map and the command line (``python -m lora_jax inspect|convert``).

Each case builds its own files under the current directory (the sweep runs it in a fresh tmp cwd).
"""

from __future__ import annotations

import contextlib
import io
import json
import pathlib
import struct

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

import lora_jax
from lora_jax._cli import main as cli_main

PARAMS = {"dense": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
SPEC = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["dense", "head"])
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _lora(spec=SPEC):
    return lora_jax.init_lora(jax.random.key(0), PARAMS, spec)


def _saved(name="ckpt", spec=SPEC) -> pathlib.Path:
    return pathlib.Path(lora_jax.save_adapter(name, _lora(spec), spec))


def _exported(name="peft") -> pathlib.Path:
    return pathlib.Path(lora_jax.export_peft(name, _lora(), SPEC))


def _edit_meta(edit, name="ckpt") -> pathlib.Path:
    path = _saved(name)
    meta_file = path / "adapter_meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    edit(meta)
    meta_file.write_text(json.dumps(meta))
    return path


def _node(meta, path="dense/kernel"):
    return meta["adapters"][path]["meta"]


def _set(d, key, value):
    d[key] = value


def _peft(name="hand", *, tensors=None, raw=None, **config) -> pathlib.Path:
    """A PEFT adapter written by hand: a config (PEFT's keys, overridable) and tensors (or raw safetensors bytes)."""
    path = pathlib.Path(name)
    path.mkdir()
    base = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q"], "use_rslora": False}
    (path / CONFIG).write_text(json.dumps({**base, **config}))
    if tensors is None:
        tensors = {
            "base_model.model.m.q.lora_A.weight": np.full((2, 4), 0.1, np.float32),
            "base_model.model.m.q.lora_B.weight": np.full((3, 2), 0.1, np.float32),
        }
    (path / WEIGHTS).write_bytes(raw if raw is not None else save(tensors, metadata={"format": "pt"}))
    return path


def _raw_safetensors(code: str, itemsize: int) -> bytes:
    """A safetensors file whose two tensors have dtype ``code`` (e.g. ``F8_E4M3``), written byte by byte."""
    a, b = 2 * 4 * itemsize, 3 * 2 * itemsize
    header = {
        "__metadata__": {"format": "pt"},
        "base_model.model.m.q.lora_A.weight": {"dtype": code, "shape": [2, 4], "data_offsets": [0, a]},
        "base_model.model.m.q.lora_B.weight": {"dtype": code, "shape": [3, 2], "data_offsets": [a, a + b]},
    }
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + bytes(a + b)


def _flip_data(path: pathlib.Path) -> pathlib.Path:
    for f in sorted(p for p in (path / "adapter").rglob("*") if p.is_file() and p.parent.name == "d"):
        data = bytearray(f.read_bytes())
        f.write_bytes(bytes(data[: len(data) // 2]))
    return path


class CliError(Exception):
    """A command that failed: its exit status and everything it printed on stderr."""


def _cli(*argv) -> None:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = cli_main([str(a) for a in argv])
        except SystemExit as e:  # argparse's usage errors
            status = e.code
    if status:
        raise CliError(f"exit {status}: {err.getvalue()}")


# one line on stderr, no traceback: "exit 1: lora_jax CMD: error: ...\n"
def _one_line(command: str, words: str) -> str:
    return rf"\Aexit 1: lora_jax {command}: error: [^\n]*{words}[^\n]*\n\Z"


def _mkdir_with(name: str, *files: str) -> pathlib.Path:
    path = pathlib.Path(name)
    path.mkdir()
    for f in files:
        (path / f).write_text("mine")
    return path


def _file(name: str = "f") -> pathlib.Path:
    path = pathlib.Path(name)
    path.write_text("not a checkpoint")
    return path


def _float8(lora):
    return jax.tree.map(lambda x: x.astype(jnp.float8_e4m3fn), lora)


# Regexes: WHERE (argument or path), what was expected, what was found.
CASES = [
    # ---------------------------------------------------------------- save_adapter: a spec that does not describe it
    (
        "save_adapter_spec_with_another_rank",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(rank=1)),
        ValueError,
        r"save_adapter\(spec=\.\.\.\) at dense/kernel: expected the adapter's rank 2, found 1 from LoraSpec\(rank",
    ),
    (
        "save_adapter_spec_with_another_alpha",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(alpha=8.0)),
        ValueError,
        r"save_adapter\(spec=\.\.\.\) at dense/kernel: expected the adapter's scale 2\.0, found 4\.0 from "
        r"LoraSpec\(alpha/alpha_pattern/rslora",
    ),
    (
        "save_adapter_spec_with_rslora",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(rslora=True)),
        ValueError,
        r"at dense/kernel: expected the adapter's scale 2\.0, found 2\.82.*rslora=True",
    ),
    (
        "save_adapter_spec_with_fewer_targets",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(targets=["dense"])),
        ValueError,
        r"save_adapter\(spec=\.\.\.\) at head/kernel: expected a spec whose targets select this LoRA kernel.*"
        r"found a spec that does not select it",
    ),
    (
        "save_adapter_spec_with_other_targets",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(targets=["typo"])),
        ValueError,
        r"save_adapter\(spec=\.\.\.\): expected the LoraSpec that describes this adapter, found a spec that cannot "
        r"be resolved.*matched no kernel",
    ),
    (
        "save_adapter_spec_with_freeze_a",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(freeze_a=True)),
        ValueError,
        r"at dense/kernel: expected the adapter's frozen \(\), found \('a',\) from LoraSpec\(freeze_a",
    ),
    (
        "save_adapter_spec_with_dropout",
        lambda: lora_jax.save_adapter("c", _lora(), SPEC.replace(dropout=0.1)),
        ValueError,
        r"at dense/kernel: expected the adapter's dropout 0\.0, found 0\.1 from LoraSpec\(dropout",
    ),
    (
        "save_adapter_trainable_leaf_not_in_spec",
        lambda: lora_jax.save_adapter(
            "c", _lora(SPEC.replace(targets=["dense"], trainable=["head"])), SPEC.replace(targets=["dense"])
        ),
        ValueError,
        r"at head/kernel: expected LoraSpec\(trainable=\.\.\.\) to select this leaf.*found a spec that gives it nothing",
    ),
    (
        "adapter_checkpoint_args_spec_with_another_rank",
        lambda: lora_jax.adapter_checkpoint_args(_lora(), SPEC.replace(rank=1)),
        ValueError,
        r"adapter_checkpoint_args\(spec=\.\.\.\) at dense/kernel: expected the adapter's rank 2, found 1",
    ),
    (
        "adapter_checkpoint_args_of_none",
        lambda: lora_jax.adapter_checkpoint_args(None, SPEC),
        TypeError,
        r"adapter_checkpoint_args\(lora=\.\.\.\): expected an adapter tree.*found NoneType.*"
        r"adapter_checkpoint_args\(lora, spec\)",
    ),
    (
        "save_adapter_spec_is_a_dict",
        lambda: lora_jax.save_adapter("c", _lora(), {"rank": 2}),
        TypeError,
        r"save_adapter\(spec=\.\.\.\): expected a LoraSpec, found dict",
    ),
    (
        "save_adapter_lora_and_spec_swapped",
        lambda: lora_jax.save_adapter("c", SPEC, _lora()),
        TypeError,
        r"save_adapter\(lora=\.\.\.\): expected an adapter tree \(from init_lora\), found LoraSpec.*"
        r"save_adapter\(path, lora, spec\)",
    ),
    (
        "save_adapter_path_and_lora_swapped",
        lambda: lora_jax.save_adapter(_lora(), "c", SPEC),
        TypeError,
        r"save_adapter\(path=\.\.\.\): expected a str or os\.PathLike.*found dict",
    ),
    # ---------------------------------------------------------------- save_adapter: what overwrite may replace
    (
        "save_adapter_overwrite_over_a_regular_file",
        lambda: lora_jax.save_adapter(_file("notes.txt"), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"save_adapter\(path=\.\.\., overwrite=True\): expected a path to create, or an orbax checkpoint to replace, "
        r"found a file at \S*notes\.txt",
    ),
    (
        "save_adapter_overwrite_over_a_directory_of_other_files",
        lambda: lora_jax.save_adapter(_mkdir_with("run", "train.py", "data.csv"), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"save_adapter\(path=\.\.\., overwrite=True\): expected an empty directory or an orbax checkpoint.*"
        r"found \S*run holding data\.csv, train\.py",
    ),
    (
        "save_adapter_overwrite_over_a_peft_adapter",
        lambda: lora_jax.save_adapter(_exported(), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"expected an empty directory or an orbax checkpoint.*holding adapter_config\.json",
    ),
    (
        "save_adapter_over_a_file_without_overwrite",
        lambda: lora_jax.save_adapter(_file(), _lora(), SPEC),
        FileExistsError,
        r"\S*/f already exists; pass save_adapter\(\.\.\., overwrite=True\)",
    ),
    # ---------------------------------------------------------------- load_adapter / read_adapter_meta: bad files
    (
        "load_adapter_missing_directory",
        lambda: lora_jax.load_adapter("missing"),
        FileNotFoundError,
        r"\S*missing: no such checkpoint directory",
    ),
    (
        "load_adapter_of_a_regular_file",
        lambda: lora_jax.load_adapter(_file("weights.bin")),
        NotADirectoryError,
        r"weights\.bin: expected an adapter checkpoint directory.*found a file at \S*weights\.bin",
    ),
    (
        "read_adapter_meta_of_a_regular_file",
        lambda: lora_jax.read_adapter_meta(_file("weights.bin")),
        NotADirectoryError,
        r"expected an adapter checkpoint directory.*found a file at \S*weights\.bin",
    ),
    (
        "load_adapter_of_an_empty_directory",
        lambda: lora_jax.load_adapter(_mkdir_with("empty")),
        ValueError,
        r"\S*empty: not a lora_jax adapter checkpoint \(no adapter_meta/metadata inside\)\. Expected a directory "
        r"written by save_adapter",
    ),
    (
        "load_adapter_of_a_peft_adapter",
        lambda: lora_jax.load_adapter(_exported()),
        ValueError,
        r"\S*peft: not a lora_jax adapter checkpoint \(no adapter_meta/metadata inside\)",
    ),
    (
        "load_adapter_path_is_a_dict",
        lambda: lora_jax.load_adapter({"dir": "ckpt"}),
        TypeError,
        r"load_adapter\(path=\.\.\.\): expected a str or os\.PathLike.*found dict",
    ),
    (
        "load_adapter_spec_as_target",
        lambda: lora_jax.load_adapter(_saved(), SPEC),
        TypeError,
        r"load_adapter\(target=\.\.\.\): expected an adapter tree.*found LoraSpec.*spec=spec",
    ),
    (
        "load_adapter_spec_is_a_dict",
        lambda: lora_jax.load_adapter(_saved(), spec={"rank": 2}),
        TypeError,
        r"load_adapter\(spec=\.\.\.\): expected a LoraSpec or None, found dict",
    ),
    (
        "load_adapter_with_another_spec",
        lambda: lora_jax.load_adapter(_saved(), spec=SPEC.replace(rank=1)),
        ValueError,
        r"\S*ckpt: the checkpoint was saved with another LoraSpec \(rank: saved 2, given 1\)",
    ),
    (
        "load_adapter_metadata_not_json",
        lambda: lora_jax.load_adapter(_saved_with_meta_text("{not json")),
        ValueError,
        r"\S*ckpt: the adapter metadata is corrupt or truncated \(Expecting",
    ),
    (
        "load_adapter_of_a_newer_version",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(m, "version", 99))),
        ValueError,
        r"\S*ckpt: adapter checkpoint version 99; this lora_jax reads versions 1 to 3",
    ),
    (
        "load_adapter_truncated_arrays_short_message",
        lambda: lora_jax.load_adapter(_flip_data(_saved())),
        ValueError,
        r"\A(?!.{400})\S*ckpt: the adapter arrays cannot be read, the checkpoint is corrupt or truncated \("
        r"\w+: [A-Z_]+ reading \S+\)\.",
    ),
    # ---------------------------------------------------------------- load_adapter: edited metadata is refused
    (
        "load_adapter_scale_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(_node(m), "scale", _node(m)["scale"] * 100))),
        ValueError,
        r"ckpt/adapter_meta/metadata: expected the record of node 'dense/kernel' to match its stored checksum "
        r"sha256:\w+, found sha256:\w+ \(its metadata.*edited",
    ),
    (
        "load_adapter_layout_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(_node(m), "layout", "oi"))),
        ValueError,
        r"metadata: expected the record of node 'dense/kernel' to match its stored checksum",
    ),
    (
        "load_adapter_kind_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(_node(m, "head/kernel"), "kind", "embed"))),
        ValueError,
        r"metadata: expected the record of node 'head/kernel' to match its stored checksum",
    ),
    (
        "load_adapter_type_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(m["adapters"]["dense/kernel"], "type", "trainable"))),
        ValueError,
        r"metadata: expected the record of node 'dense/kernel' to match its stored checksum",
    ),
    (
        "load_adapter_dropout_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(_node(m), "dropout", 0.5))),
        ValueError,
        r"metadata: expected the record of node 'dense/kernel' to match its stored checksum",
    ),
    (
        "load_adapter_frozen_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(_node(m), "frozen", ["a"]))),
        ValueError,
        r"metadata: expected the record of node 'dense/kernel' to match its stored checksum",
    ),
    (
        "load_adapter_spec_edited",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: _set(m["spec"], "alpha", 400.0))),
        ValueError,
        r"metadata: expected the record of the spec to match its stored checksum sha256:\w+, found sha256:\w+",
    ),
    (
        "load_adapter_checksums_removed",
        lambda: lora_jax.load_adapter(_edit_meta(lambda m: m.pop("checksums"))),
        ValueError,
        r"metadata: expected a version 3 record with its 'checksums', found none",
    ),
    (
        "read_adapter_meta_scale_edited",
        lambda: lora_jax.read_adapter_meta(_edit_meta(lambda m: _set(_node(m), "scale", 400.0))),
        ValueError,
        r"metadata: expected the record of node 'dense/kernel' to match its stored checksum",
    ),
    # ---------------------------------------------------------------- export_peft
    (
        "export_peft_overwrite_over_a_regular_file",
        lambda: lora_jax.export_peft(_file("model.bin"), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"export_peft\(path=\.\.\., overwrite=True\): expected a path to create, or a PEFT adapter to replace, "
        r"found a file at \S*model\.bin",
    ),
    (
        "export_peft_overwrite_over_an_orbax_checkpoint",
        lambda: lora_jax.export_peft(_saved(), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"export_peft\(path=\.\.\., overwrite=True\): expected an empty directory or a PEFT adapter.*"
        r"found \S*ckpt holding _CHECKPOINT_METADATA, adapter",
    ),
    (
        "export_peft_overwrite_over_a_directory_with_other_files",
        lambda: lora_jax.export_peft(_mkdir_with("out", CONFIG, WEIGHTS, "train.log"), _lora(), SPEC, overwrite=True),
        FileExistsError,
        r"expected an empty directory or a PEFT adapter.*found \S*out holding train\.log",
    ),
    (
        "export_peft_spec_with_rslora",
        lambda: lora_jax.export_peft("p", _lora(), SPEC.replace(rslora=True)),
        ValueError,
        r"export_peft\(spec=\.\.\.\) at dense/kernel: expected the adapter's scale 2\.0, found 2\.8",
    ),
    (
        "export_peft_float8_adapter",
        lambda: lora_jax.export_peft("p", _float8(_lora()), SPEC),
        ValueError,
        r"export_peft\(lora=\.\.\.\) at dense/kernel/a: expected an array of a dtype PEFT reads \(float16, "
        r"bfloat16, float32, float64\), found dtype float8_e4m3fn",
    ),
    (
        "export_peft_lora_and_spec_swapped",
        lambda: lora_jax.export_peft("p", SPEC, _lora()),
        TypeError,
        r"export_peft\(lora=\.\.\.\): expected an adapter tree \(from init_lora\), found LoraSpec",
    ),
    (
        "export_peft_conv_is_a_number",
        lambda: lora_jax.export_peft("p", _lora(), SPEC, conv=3),
        TypeError,
        r"export_peft\(conv=\.\.\.\): expected 'auto', None, a regex string.*found int 3",
    ),
    (
        "export_peft_name_map_is_a_number",
        lambda: lora_jax.export_peft("p", _lora(), SPEC, name_map=3),
        TypeError,
        r"name_map: expected None, a dict \{parameter path: torch module name\} or a callable.*found int 3",
    ),
    # ---------------------------------------------------------------- import_peft
    (
        "import_peft_activated_lora",
        lambda: lora_jax.import_peft(_peft(alora_invocation_tokens=[1, 2, 3])),
        ValueError,
        r"adapter_config\.json: alora_invocation_tokens: expected null \(a plain LoRA adapter\), found list "
        r"\[1, 2, 3\].*activated LoRA",
    ),
    (
        "import_peft_nan_tensor",
        lambda: lora_jax.import_peft(
            _peft(
                tensors={
                    "base_model.model.m.q.lora_A.weight": np.full((2, 4), np.nan, np.float32),
                    "base_model.model.m.q.lora_B.weight": np.ones((3, 2), np.float32),
                }
            )
        ),
        ValueError,
        r"adapter_model\.safetensors: tensor 'base_model\.model\.m\.q\.lora_A\.weight': expected finite values, "
        r"found 8 NaN/inf of 8",
    ),
    (
        "import_peft_inf_tensor",
        lambda: lora_jax.import_peft(
            _peft(
                tensors={
                    "base_model.model.m.q.lora_A.weight": np.ones((2, 4), np.float32),
                    "base_model.model.m.q.lora_B.weight": np.array([[1, 2], [3, np.inf], [5, 6]], np.float32),
                }
            )
        ),
        ValueError,
        r"tensor 'base_model\.model\.m\.q\.lora_B\.weight': expected finite values, found 1 NaN/inf of 6",
    ),
    (
        "import_peft_use_rslora_string",
        lambda: lora_jax.import_peft(_peft(use_rslora="false")),
        ValueError,
        r"adapter_config\.json: use_rslora: expected true or false \(a JSON bool\), found str 'false'",
    ),
    (
        "import_peft_float8_file",
        lambda: lora_jax.import_peft(_peft(raw=_raw_safetensors("F8_E4M3", 1))),
        ValueError,
        r"adapter_model\.safetensors: tensor 'base_model\.model\.m\.q\.lora_A\.weight': expected a floating tensor "
        r"\(F16, BF16, F32 or F64\).*found dtype F8_E4M3",
    ),
    (
        "import_peft_integer_tensors",
        lambda: lora_jax.import_peft(_peft(raw=_raw_safetensors("I32", 4))),
        ValueError,
        r"tensor 'base_model\.model\.m\.q\.lora_A\.weight': expected a floating tensor.*found dtype I32",
    ),
    (
        "import_peft_lora_alpha_null",
        lambda: lora_jax.import_peft(_peft(lora_alpha=None)),
        ValueError,
        r"adapter_config\.json: lora_alpha: expected a positive number \(PEFT's alpha\), found NoneType None",
    ),
    (
        "import_peft_lora_alpha_zero",
        lambda: lora_jax.import_peft(_peft(lora_alpha=0)),
        ValueError,
        r"adapter_config\.json: lora_alpha: expected a positive number \(PEFT's alpha\), found int 0",
    ),
    (
        "import_peft_rank_as_string",
        lambda: lora_jax.import_peft(_peft(r="2")),
        ValueError,
        r"adapter_config\.json: r: expected a positive integer rank, found str '2'",
    ),
    (
        "import_peft_alpha_pattern_zero",
        lambda: lora_jax.import_peft(_peft(alpha_pattern={"q": 0})),
        ValueError,
        r"adapter_config\.json: alpha_pattern\['q'\]: expected a positive number, found int 0",
    ),
    (
        "import_peft_dora_without_magnitudes",
        lambda: lora_jax.import_peft(_peft(use_dora=True)),
        ValueError,
        r"hand: module 'm\.q': expected a lora_magnitude_vector \(the config says use_dora=true\), found none",
    ),
    (
        "import_peft_missing_directory",
        lambda: lora_jax.import_peft("missing"),
        FileNotFoundError,
        r"\S*missing: no such PEFT adapter directory",
    ),
    (
        "import_peft_of_a_regular_file",
        lambda: lora_jax.import_peft(_file(WEIGHTS)),
        NotADirectoryError,
        r"adapter_model\.safetensors: expected a PEFT adapter directory.*found a file at \S*adapter_model\.safetensors",
    ),
    (
        "import_peft_of_an_orbax_checkpoint",
        lambda: lora_jax.import_peft(_saved()),
        ValueError,
        r"\S*ckpt: not a PEFT adapter \(expected adapter_config\.json and adapter_model\.safetensors inside\)",
    ),
    (
        "import_peft_truncated_weights",
        lambda: lora_jax.import_peft(_peft(raw=save({"base_model.model.m.q.lora_A.weight": np.ones(4)})[:30])),
        ValueError,
        r"adapter_model\.safetensors: cannot read the tensors, the file is corrupt or truncated \(the header says",
    ),
    (
        "import_peft_params_and_path_swapped",
        lambda: lora_jax.import_peft(PARAMS, _exported()),
        TypeError,
        r"import_peft\(path=\.\.\.\): expected a str or os\.PathLike.*found dict",
    ),
    (
        "import_peft_params_is_a_list",
        lambda: lora_jax.import_peft(_peft(), [1, 2]),
        TypeError,
        r"import_peft\(params=\.\.\.\): expected the base parameter tree.*found list \[1, 2\]",
    ),
    (
        "import_peft_axes_is_a_number",
        lambda: lora_jax.import_peft(_exported(), PARAMS, axes=3),
        TypeError,
        r"import_peft\(axes=\.\.\.\): expected kernel layouts \{pattern: layout\}.*found int 3",
    ),
    # ---------------------------------------------------------------- default_name_map
    (
        "default_name_map_of_a_number",
        lambda: lora_jax.default_name_map(3),
        TypeError,
        r"default_name_map\(path=\.\.\.\): expected a parameter path such as '\S+', found int 3",
    ),
    (
        "default_name_map_of_a_top_level_leaf",
        lambda: lora_jax.default_name_map("kernel"),
        ValueError,
        r"kernel: a top-level leaf has no module name under the default name_map; pass name_map=\{'kernel'",
    ),
    # ---------------------------------------------------------------- the command line
    (
        "cli_convert_src_onto_itself_with_overwrite",
        lambda: _cli("convert", _saved(), "ckpt", "--overwrite"),
        CliError,
        _one_line("convert", r"convert SRC DST: expected a DST other than SRC.*found DST = SRC = \S*ckpt"),
    ),
    (
        "cli_convert_src_onto_itself",
        lambda: _cli("convert", _saved(), "ckpt"),
        CliError,
        _one_line("convert", r"\S*ckpt already exists; pass --overwrite"),
    ),
    (
        "cli_convert_overwrite_over_a_regular_file",
        lambda: _cli("convert", _saved(), _file("notes.txt"), "--overwrite"),
        CliError,
        _one_line("convert", r"expected a path to create, or a PEFT adapter to replace, found a file at \S*notes"),
    ),
    (
        "cli_convert_overwrite_over_a_directory_of_other_files",
        lambda: _cli("convert", _exported(), _mkdir_with("home", "thesis.tex"), "--overwrite"),
        CliError,
        _one_line("convert", r"expected an empty directory or an orbax checkpoint.*holding thesis\.tex"),
    ),
    (
        "cli_inspect_float8_peft_file",
        lambda: _cli("inspect", _peft(raw=_raw_safetensors("F8_E5M2", 1))),
        CliError,
        _one_line("inspect", r"expected a floating tensor.*found dtype F8_E5M2"),
    ),
    (
        "cli_inspect_activated_lora",
        lambda: _cli("inspect", _peft(alora_invocation_tokens=[7])),
        CliError,
        _one_line("inspect", r"alora_invocation_tokens: expected null.*found list \[7\]"),
    ),
    (
        "cli_inspect_edited_checkpoint",
        lambda: _cli("inspect", _edit_meta(lambda m: _set(_node(m), "scale", 400.0))),
        CliError,
        _one_line("inspect", r"expected the record of node 'dense/kernel' to match its stored checksum"),
    ),
    (
        "cli_inspect_a_regular_file",
        lambda: _cli("inspect", _file()),
        CliError,
        _one_line("inspect", r"\S*/f: not a directory; an adapter is an orbax checkpoint or a PEFT adapter"),
    ),
    (
        "cli_inspect_missing",
        lambda: _cli("inspect", "missing"),
        CliError,
        _one_line("inspect", r"\S*missing: no such file or directory"),
    ),
    (
        "cli_convert_name_map_not_json",
        lambda: _cli("convert", _saved(), "out", "--name-map", _file("map.json")),
        CliError,
        _one_line("convert", r"--name-map \S*map\.json: cannot read a JSON object"),
    ),
    (
        "cli_convert_without_dst",
        lambda: _cli("convert", "ckpt"),
        CliError,
        r"\Aexit 2: usage: python -m lora_jax convert .*error: the following arguments are required: dst",
    ),
]


def _saved_with_meta_text(text: str) -> pathlib.Path:
    path = _saved()
    (path / "adapter_meta" / "metadata").write_text(text)
    return path
