"""LoraSpec: validation, normalization, scaling."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import pytest

from lora_jax import LoraSpec


def test_spec_is_frozen_and_hashable():
    spec = LoraSpec(rank=4, targets=["query", "value"], axes={"query": "ioo"}, rank_pattern={"value": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.rank = 8  # type: ignore[misc]
    assert hash(spec) == hash(
        LoraSpec(rank=4, targets=["query", "value"], axes={"query": "ioo"}, rank_pattern={"value": 2})
    )


def test_spec_normalizes_containers_to_tuples():
    spec = LoraSpec(targets=["a", "b"], axes={"a": "ioo"}, rank_pattern={"b": 2}, alpha_pattern={"a": 3})
    assert spec.targets == ("a", "b")
    assert spec.axes == (("a", "ioo"),)
    assert spec.rank_pattern == (("b", 2),)
    assert spec.alpha_pattern == (("a", 3.0),)


@pytest.mark.parametrize(
    ("rank", "alpha", "rslora", "expected"),
    [(4, 8.0, False, 2.0), (4, 8.0, True, 4.0), (16, 16.0, True, 4.0), (3, 1.0, False, 1 / 3)],
)
def test_scale_is_alpha_over_r_or_sqrt_r(rank, alpha, rslora, expected):
    spec = LoraSpec(rank=rank, alpha=alpha, rslora=rslora)
    assert math.isclose(spec.scale_for(rank, alpha), expected, rel_tol=1e-12)


def test_init_aliases_and_dtype_are_normalized():
    assert LoraSpec(init="default").init == "kaiming"
    assert LoraSpec(init="kaiming_uniform").init == "kaiming"
    assert LoraSpec(dtype=jnp.bfloat16).dtype == "bfloat16"


def test_replace_validates_again():
    assert LoraSpec(rank=4).replace(rank=16).rank == 16
    with pytest.raises(ValueError, match=r"LoraSpec\(rank=\.\.\.\): expected a positive integer, found int 0"):
        LoraSpec(rank=4).replace(rank=0)
