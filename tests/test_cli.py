"""``python -m lora_jax``: inspect, convert, demo, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax._cli import main

PARAMS = {
    "model": {
        "q_proj": {"kernel": jnp.ones((8, 4))},
        "emb": {"embedding": jnp.ones((10, 4))},
        "head": {"kernel": jnp.ones((4, 2)), "bias": jnp.zeros(2)},
    }
}
SPEC = lora_jax.LoraSpec(rank=2, alpha=6.0, targets=["q_proj", "emb"], trainable=["head"], init="random")


@pytest.fixture(scope="module")
def orbax_dir(tmp_path_factory):
    lora = lora_jax.init_lora(jax.random.key(0), PARAMS, SPEC)
    return lora_jax.save_adapter(tmp_path_factory.mktemp("cli") / "orbax", lora, SPEC), lora


def test_inspect_prints_the_summary_table_of_an_orbax_checkpoint(orbax_dir, capsys):
    path, _ = orbax_dir
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("orbax adapter checkpoint") and "rank=2 alpha=6" in out[0]
    assert out[1].split() == ["path", "kind", "kernel", "layout", "rank", "scale", "adapter", "params", "bytes"]
    assert any(line.split()[:5] == ["model/q_proj/kernel", "linear", "8x4", "io", "2"] for line in out)
    assert any(line.split()[:2] == ["model/emb/embedding", "embed"] for line in out)
    assert out[-1].startswith(f"adapter params: {8 * 2 + 2 * 4 + 10 * 2 + 2 * 4 + 8 + 2:,}")


def test_convert_orbax_to_peft_and_back_is_lossless(orbax_dir, tmp_path, capsys):
    path, lora = orbax_dir
    assert main(["convert", str(path), str(tmp_path / "peft")]) == 0
    assert main(["inspect", str(tmp_path / "peft")]) == 0
    assert "PEFT adapter" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "peft"), str(tmp_path / "back")]) == 0
    back, spec = lora_jax.load_adapter(tmp_path / "back", params=PARAMS)
    assert spec.rank == 2 and spec.alpha == 6.0
    for p, node in lora_jax.adapter_items(lora).items():
        got = lora_jax.adapter_items(back)[p]
        assert jax.tree.structure(got) == jax.tree.structure(node), p
        for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(node), strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["inspect", "{tmp}/missing"], "no such file or directory"),
        (["inspect", "{tmp}"], "neither an orbax adapter checkpoint"),
        (["convert", "{orbax}", "{orbax}"], "already exists; pass --overwrite"),
        (["convert", "{orbax}", "{tmp}/x", "--name-map", "{tmp}/missing.json"], "cannot read a JSON object"),
    ],
)
def test_bad_paths_print_one_line_and_fail(orbax_dir, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, orbax=orbax_dir[0]) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and err.startswith(f"lora_jax {argv[0]}: error:")


def test_a_corrupt_peft_file_is_one_line_without_traceback(orbax_dir, tmp_path):
    main(["convert", str(orbax_dir[0]), str(tmp_path / "peft")])
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    run = subprocess.run(
        [sys.executable, "-m", "lora_jax", "inspect", str(tmp_path / "peft")], capture_output=True, text=True
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and "corrupt or truncated" in run.stderr and "Traceback" not in run.stderr


def test_demo_without_the_demo_package_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lora_jax.demo", None)  # as if lora_jax.demo were not installed
    assert main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no lora_jax.demo" in err


def test_demo_forwards_its_arguments(monkeypatch):
    import types

    seen = []
    fake = types.ModuleType("lora_jax.demo")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "lora_jax.demo", fake)
    monkeypatch.setattr(lora_jax, "demo", fake, raising=False)
    assert main(["demo", "--steps", "3"]) == 0
    assert seen == [["--steps", "3"]]


def test_convert_never_imports_torch(orbax_dir, tmp_path):
    script = (
        "import sys\n"
        "from lora_jax._cli import main\n"
        f"assert main(['convert', {str(orbax_dir[0])!r}, {str(tmp_path / 'p')!r}]) == 0\n"
        f"assert main(['convert', {str(tmp_path / 'p')!r}, {str(tmp_path / 'o')!r}]) == 0\n"
        "print('torch loaded:', 'torch' in sys.modules)\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "torch loaded: False"


def test_diagnose_prints_the_table_with_and_without_the_base(orbax_dir, tmp_path, capsys):
    """``diagnose`` on a saved adapter: without --params no norm ratio; with the base as a safetensors file in
    torch's names and (out, in) layout, or as an orbax params checkpoint, lora_jax.diagnose's own ratios."""
    import orbax.checkpoint as ocp
    from safetensors.numpy import save_file

    path, lora = orbax_dir
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), PARAMS)
    want = lora_jax.diagnose(params, lora)
    assert main(["diagnose", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["path", "norm", "ratio"] and out[-1].startswith("(no --params")
    q = next(line.split() for line in out if line.startswith("model/q_proj/kernel"))
    assert q[1] == "-" and float(q[2]) == pytest.approx(float(want["model/q_proj/kernel"]["delta_norm"]), rel=1e-3)

    torch_names = {
        "model.q_proj.weight": np.asarray(params["model"]["q_proj"]["kernel"]).T.copy(),  # torch's (out, in)
        "model.emb.weight": np.asarray(params["model"]["emb"]["embedding"]),
    }
    save_file(torch_names, str(tmp_path / "base.safetensors"))
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "base-orbax", params)
    ckpt.wait_until_finished()
    png = tmp_path / "diag.png"
    for base in (tmp_path / "base.safetensors", tmp_path / "base-orbax"):
        assert main(["diagnose", str(path), "--params", str(base), "--png", str(png)]) == 0
        rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
        for p in ("model/q_proj/kernel", "model/emb/embedding"):
            assert float(rows[p][1]) == pytest.approx(float(want[p]["norm_ratio"]), rel=1e-3), (base, p)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    wrong = {**torch_names, "model.q_proj.weight": np.ones((3, 3), np.float32)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    assert main(["diagnose", str(path), "--params", str(tmp_path / "wrong.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "has shape (3, 3), but the adapter at model/q_proj/kernel fits a kernel of shape (8, 4)" in err
