"""Docs checks: every public name has a docstring with a runnable example whose Args match its signature.

The examples themselves run as doctests (``--doctest-modules`` over lora_jax/);
these tests make sure no public name goes without one.
"""

from __future__ import annotations

import inspect
import re
import types

import pytest

import lora_jax

PUBLIC = sorted(
    name
    for name in vars(lora_jax)
    if not name.startswith("_") and not isinstance(getattr(lora_jax, name), types.ModuleType)
)
DOCUMENTED = [name for name in PUBLIC if callable(getattr(lora_jax, name))]

#: Public names whose docstring still lacks a ``>>>`` example (owned by other
#: modules; reported to their owners). Remove a name here when its example is
#: added; the set must shrink to empty, and a name may never be added to it.
MISSING_EXAMPLES = frozenset({"Factored", "FactoredError"})


def _doc(name: str) -> str:
    return inspect.getdoc(getattr(lora_jax, name)) or ""


def _args_section(doc: str) -> list[str]:
    """The argument names listed under ``Args:`` in a Google-style docstring."""
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, flags=re.M)
    if not m:
        return []
    lines = m.group(1).splitlines()
    indent = min(len(line) - len(line.lstrip()) for line in lines if line.strip())
    return [
        re.match(r"\**(\w+)", line.strip()).group(1)
        for line in lines
        if line.strip() and len(line) - len(line.lstrip()) == indent and re.match(r"\s*\**\w+.*:", line)
    ]


def test_public_names_are_listed():
    assert "apply_lora" in PUBLIC and "LoraSpec" in PUBLIC
    assert lora_jax.__version__


def test_missing_examples_list_is_current():
    stale = sorted(n for n in MISSING_EXAMPLES if n not in DOCUMENTED or ">>>" in _doc(n))
    assert not stale, f"{stale} now have examples (or are gone): remove them from MISSING_EXAMPLES in {__file__}."


@pytest.mark.parametrize("name", [n for n in DOCUMENTED if n not in MISSING_EXAMPLES])
def test_public_name_has_a_docstring_with_an_example(name):
    doc = _doc(name)
    assert doc.strip(), f"lora_jax.{name} has no docstring; add a one-line summary, Args, Returns and an example."
    assert ">>>" in doc, (
        f"lora_jax.{name} has a docstring but no runnable example; add a short '>>>' example "
        f"(it runs as a doctest under --doctest-modules)."
    )


@pytest.mark.parametrize("name", [n for n in DOCUMENTED if inspect.isfunction(getattr(lora_jax, n))])
def test_documented_args_match_the_signature(name):
    listed = _args_section(_doc(name))
    signature = inspect.signature(getattr(lora_jax, name)).parameters.values()
    params = [p.name for p in signature if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    variadic = [p.name for p in signature if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]  # may be documented
    unknown = [a for a in listed if a not in params + variadic]
    assert not unknown, f"lora_jax.{name}: its docstring's Args lists {unknown}, which the signature {params} lacks."
    if listed:
        missing = [p for p in params if p not in listed]
        assert not missing, f"lora_jax.{name}: the signature has {missing}, which its docstring's Args does not list."
