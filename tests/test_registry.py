"""Node types are registered and dispatched by exact type; a variant defined here runs through every transform."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import delta_np, f64
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import LoraSpec, LoraWeights, LowRank, apply_lora, init_lora, merge, unmerge


def _static(**kw):
    return dataclasses.field(metadata={"static": True}, **kw)


@lora_jax.register_adapter(name="test-scaled-output")
@dataclasses.dataclass(frozen=True)
class ScaledOutput:
    """A variant defined outside the package: ``delta = scale * A @ B @ diag(g)``, g trained per output unit."""

    a: jax.Array
    b: jax.Array
    g: jax.Array
    scale: float = _static(default=1.0)
    layout: str = _static(default="io")

    def lower(self, shared):
        del shared
        return LowRank(self.a, self.b * self.g[..., None, :], scale=self.scale, layout=self.layout)

    def field_axes(self):
        return {"a": "BIr", "b": "BrO", "g": "BO"}


def _variant(params, key=0):
    lora = init_lora(jax.random.key(key), params, LoraSpec(rank=2, targets=["dense"], init="random"))
    node = lora["dense"]["kernel"]
    g = jax.random.uniform(jax.random.key(key + 1), (node.b.shape[-1],), minval=0.5, maxval=1.5)
    return {"dense": {"kernel": ScaledOutput(node.a, node.b, g, scale=node.scale, layout=node.layout)}}


def _expected(w, node):
    return f64(w) + delta_np(node.a, f64(node.b) * f64(node.g)[None, :], node.scale, "io")


PARAMS = {"dense": {"kernel": jax.random.normal(jax.random.key(9), (6, 5)), "bias": jnp.zeros(5)}}


def test_registered_variant_applies_and_merges_against_float64_reference():
    lora = _variant(PARAMS)
    want = _expected(PARAMS["dense"]["kernel"], lora["dense"]["kernel"])
    for fn in (apply_lora, jax.jit(apply_lora), merge):
        got = fn(PARAMS, lora)["dense"]["kernel"]
        np.testing.assert_allclose(f64(got), want, rtol=1e-6, atol=1e-6)
    back = unmerge(merge(PARAMS, lora), lora)["dense"]["kernel"]
    np.testing.assert_allclose(f64(back), f64(PARAMS["dense"]["kernel"]), atol=1e-6)


def test_registered_variant_runs_factored_with_the_same_values_and_gradients():
    lora = _variant(PARAMS)
    x = jax.random.normal(jax.random.key(3), (4, 6))

    def fn(p, x):
        return jnp.tanh(x @ p["dense"]["kernel"] + p["dense"]["bias"]).sum()

    ref = jax.value_and_grad(lambda lo: fn(apply_lora(PARAMS, lo), x))(lora)
    got = jax.jit(jax.value_and_grad(lambda lo: lora_jax.factored(fn)(PARAMS, lo, x)))(lora)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6)
    for name in ("a", "b", "g"):
        np.testing.assert_allclose(
            getattr(got[1]["dense"]["kernel"], name), getattr(ref[1]["dense"]["kernel"], name), rtol=1e-5, atol=1e-6
        )
    assert np.abs(np.asarray(ref[1]["dense"]["kernel"].g)).sum() > 0  # g trains


def test_registered_variant_round_trips_through_orbax(tmp_path):
    lora = _variant(PARAMS)
    spec = LoraSpec(rank=2, targets=["dense"], init="random")
    path = lora_jax.save_adapter(tmp_path / "ckpt", lora, spec)
    back, _ = lora_jax.load_adapter(path, params=PARAMS)
    node = back["dense"]["kernel"]
    assert type(node) is ScaledOutput and node.scale == lora["dense"]["kernel"].scale
    for name in ("a", "b", "g"):
        np.testing.assert_array_equal(getattr(node, name), getattr(lora["dense"]["kernel"], name))


def test_registered_variant_gets_shardings_from_its_field_axes():
    lora = _variant(PARAMS)
    column = lora_jax.adapter_shardings({"dense": {"kernel": P(None, "model")}}, lora)["dense"]["kernel"]
    assert (column.a, column.b, column.g) == (P(), P(None, "model"), P("model"))
    row = lora_jax.adapter_shardings({"dense": {"kernel": P("model", None)}}, lora)["dense"]["kernel"]
    assert (row.a, row.b, row.g) == (P("model"), P(), P())


def test_registered_variant_is_counted_by_summary():
    s = lora_jax.summary(PARAMS, _variant(PARAMS))
    (row,) = s.rows
    assert row.kind == "test-scaled-output (linear)" and row.rank == 2 and row.layout == "io"
    assert row.params == 6 * 2 + 2 * 5 + 5 and s.trainable_params == row.params


def test_a_subclass_of_a_registered_type_is_refused_not_treated_as_its_parent():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Dora(LoraWeights):
        m: jax.Array = None

    node = init_lora(jax.random.key(0), PARAMS, LoraSpec(rank=2, targets=["dense"]))["dense"]["kernel"]
    lora = {"dense": {"kernel": Dora(node.a, node.b, scale=node.scale, m=jnp.ones(5))}}
    for call in (
        lambda: apply_lora(PARAMS, lora),
        lambda: merge(PARAMS, lora),
        lambda: lora_jax.factored(lambda p, x: x @ p["dense"]["kernel"])(PARAMS, lora, jnp.ones((1, 6))),
        lambda: lora_jax.summary(PARAMS, lora),
        lambda: lora_jax.adapter_shardings({"dense": {"kernel": P()}}, lora),
        lambda: lora_jax.save_adapter("/nonexistent/never-written", lora, LoraSpec(rank=2, targets=["dense"])),
        lambda: lora_jax.only_adapters(__import__("optax").adam(0.1)).init(lora),  # not silently frozen
        lambda: lora_jax.split(lora),
    ):
        with pytest.raises(TypeError, match=r"dense/kernel: .*Dora is not a registered adapter node type.*subclasses"):
            call()


def test_an_unregistered_node_type_raises_naming_it():
    @dataclasses.dataclass(frozen=True)
    class Mystery:
        a: jax.Array

    with pytest.raises(TypeError, match=r"dense/kernel: .*Mystery is not a registered adapter node type"):
        apply_lora(PARAMS, {"dense": {"kernel": Mystery(jnp.ones(3))}})


def test_register_adapter_refuses_a_taken_name_and_a_class_without_lower():
    @dataclasses.dataclass(frozen=True)
    class Other:
        a: jax.Array

        def lower(self, shared):
            return None

        def field_axes(self):
            return {"a": "BIr"}

    with pytest.raises(ValueError, match=r"'lora' is taken by lora_jax\.adapters\._nodes\.LoraWeights"):
        lora_jax.register_adapter(Other, name="lora")

    @dataclasses.dataclass(frozen=True)
    class NoLower:
        a: jax.Array

    with pytest.raises(TypeError, match=r"has no lower\(\) method"):
        lora_jax.register_adapter(NoLower, name="test-no-lower")


def test_register_adapter_refuses_a_class_that_is_a_pytree_already():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class Prebuilt:
        a: jax.Array
        layout: str = _static(default="io")

        def lower(self, shared):
            return LowRank(self.a, self.a, scale=1.0, layout=self.layout)

        def field_axes(self):
            return {"a": "BIr"}

    with pytest.raises(TypeError, match=r"is a pytree already .* let register_adapter register the pytree"):
        lora_jax.register_adapter(Prebuilt, name="test-prebuilt")


def test_a_lowered_form_whose_factors_do_not_fit_raises_naming_the_path():
    @lora_jax.register_adapter(name="test-misfit")
    @dataclasses.dataclass(frozen=True)
    class Misfit:
        a: jax.Array
        b: jax.Array

        def lower(self, shared):
            return LowRank(self.a, self.b, scale=1.0, layout="io")

        def field_axes(self):
            return {"a": "BIr", "b": "BrO"}

    lora = {
        "dense": {"kernel": Misfit(jnp.ones((6, 2)), jnp.ones((1, 5)))}
    }  # rank 2 against rank 1: einsum would broadcast
    with pytest.raises(
        ValueError, match=r"dense/kernel: the adapter's factors do not fit each other: A \(6, 2\) and B \(1, 5\)"
    ):
        apply_lora(PARAMS, lora)
