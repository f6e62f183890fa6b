"""The README's examples run as written, and its CI commands are present."""

import pathlib
import re
import subprocess
import sys
import tempfile

from _xla_env import xla_env

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def runnable_blocks(marker: str = "run") -> list[str]:
    """The python blocks marked ``<!-- test:MARKER -->``, in order (the ``run`` ones share one namespace)."""
    return re.findall(rf"<!-- test:{marker} -->\n```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_install_and_test_commands():
    text = README.read_text()
    assert "<!-- ci:install -->" in text and "<!-- ci:test -->" in text
    assert "python -m lora_jax demo" in text


def test_readme_examples_run(capsys, tmp_path, monkeypatch):
    blocks = runnable_blocks()
    assert len(blocks) >= 2, "README lost its quickstart or checkpoint example"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the examples' files go to tmp_path
    namespace: dict = {}
    for k, block in enumerate(blocks):
        exec(compile(block, f"README.md:block{k}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params" in out and "loss" in out
    assert "{'hidden/kernel': ('dot_general (dense)',)}" in out  # the factored block ran (auto: dense at 256 rows)


def test_readme_sharded_example_runs_on_8_devices(tmp_path):
    (block,) = runnable_blocks("sharded")
    run = subprocess.run(
        [sys.executable, "-c", block], env=xla_env(8), cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sharded step: loss" in run.stdout
