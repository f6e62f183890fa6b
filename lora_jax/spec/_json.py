"""``LoraSpec`` <-> JSON: how a checkpoint stores the spec it was made with."""

from __future__ import annotations

from typing import Any

from lora_jax.errors._messages import expected
from lora_jax.spec._spec import LoraSpec

_SPEC_FIELDS = tuple(f.name for f in LoraSpec.__dataclass_fields__.values())


def _selector_to_json(name: str, value: Any) -> Any:
    if callable(value):
        raise ValueError(
            f"LoraSpec({name}=<callable>) cannot be saved: a function is not data. Write the selection as a "
            f"regex string (e.g. {name}=r'.*/(query|value)/kernel') or a list of key names "
            f"(e.g. {name}=['query', 'value']) so the checkpoint can restore the spec."
        )
    return list(value) if isinstance(value, tuple) else value


def spec_to_json(spec: LoraSpec) -> dict[str, Any]:
    """A JSON-ready dict of ``spec`` (inverse: :func:`spec_from_json`).

    Regex targets stay strings, name lists become lists, pattern dicts keep
    their order.

    Raises:
      ValueError: if a selector is a callable (not serializable); use a regex
        string or a list of names instead.

    Example:
      >>> d = spec_to_json(LoraSpec(rank=4, targets=["query", "value"], rank_pattern={"value": 2}))
      >>> d["targets"], d["rank_pattern"]
      (['query', 'value'], {'value': 2})
      >>> spec_from_json(d) == LoraSpec(rank=4, targets=["query", "value"], rank_pattern={"value": 2})
      True
    """
    if not isinstance(spec, LoraSpec):
        raise TypeError(expected("spec_to_json(spec=...)", "a LoraSpec", spec))
    out: dict[str, Any] = {}
    for name in _SPEC_FIELDS:
        value = getattr(spec, name)
        if name in ("targets", "exclude", "trainable"):
            value = _selector_to_json(name, value)
        elif name in ("rank_pattern", "alpha_pattern", "axes"):
            value = dict(value)
        out[name] = value
    return out


def spec_from_json(data: dict[str, Any]) -> LoraSpec:
    """The :class:`LoraSpec` written by :func:`spec_to_json` (validated again).

    Raises:
      TypeError: if ``data`` is not a dict, or a field has the wrong type (a
        string ``"false"`` for a bool, say).
      ValueError: on fields this version does not know (misspelt, or a newer
        lora_jax wrote it) or on invalid values.

    Example:
      >>> spec_from_json({"rank": 2, "targets": "dense/kernel"}).rank
      2
    """
    if not isinstance(data, dict):
        raise TypeError(
            expected("spec_from_json(data=...)", "a dict (the JSON object spec_to_json wrote)", data,
                     "Parse the JSON text first: spec_from_json(json.loads(text))")
        )  # fmt: skip
    unknown = [k for k in data if k not in _SPEC_FIELDS]
    if unknown:
        raise ValueError(
            expected(
                "spec_from_json(data=...)",
                "only the fields of LoraSpec",
                f"unknown field(s) {unknown}",
                f"A key is misspelt, or another lora_jax version wrote it. Known fields: {', '.join(_SPEC_FIELDS)}",
                found_is_text=True,
            )
        )
    return LoraSpec(**data)
