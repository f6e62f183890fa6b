"""The README's quickstart runs as written, and its CI commands are present."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_install_and_test_commands():
    text = README.read_text()
    assert "<!-- ci:install -->" in text and "<!-- ci:test -->" in text


def test_readme_quickstart_runs(capsys):
    blocks = python_blocks()
    assert blocks, "README has no python blocks"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md:quickstart", "exec"), namespace)
    out = capsys.readouterr().out
    assert "trainable params" in out and "loss" in out
