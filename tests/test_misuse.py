"""The misuse sweep: every public name and CLI command, used as a careless user would, gives a clear error.

Each case is ``(name, call, error type, regex)``; the regex holds the words that matter (the argument or
parameter path, what was expected, what was found, the hint). Cases live in ``tests/misuse_cases/``, one module
per area, each exporting ``CASES``; later issues append their own modules.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import pytest

CASE_DIR = pathlib.Path(__file__).parent / "misuse_cases"


def _cases() -> list:
    out = []
    for file in sorted(CASE_DIR.glob("[a-z]*.py")):
        module = importlib.import_module(f"misuse_cases.{file.stem}")
        out += [pytest.param(*case[1:], id=f"{file.stem}:{case[0]}") for case in module.CASES]
    return out


CASES = _cases()


def test_the_sweep_has_at_least_80_cases():
    assert len(CASES) >= 80, f"the misuse sweep has {len(CASES)} cases; the issue asks for at least 80"


@pytest.mark.parametrize(("call", "error", "pattern"), CASES)
def test_misuse_raises_a_clear_error(call, error, pattern, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(error) as info:
        call()
    assert re.search(pattern, str(info.value), flags=re.S), f"unclear message: {info.value}"
