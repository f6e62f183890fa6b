"""Node types are registered and dispatched by exact type; a variant defined here runs through every transform."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import delta_np, f64
from jax.sharding import NamedSharding
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


# ------------------------------------------------------------------ a variant that reads the shared section

R = 3  # the rank of the shared projections


@lora_jax.register_adapter(name="test-shared-projection")
@dataclasses.dataclass(frozen=True)
class SharedProjection:
    """VeRA-like: ``delta = scale * (A0[:in] * d) @ (B0[:, :out] * b)``.

    ``d`` (r) and ``b`` (out) train per node; the projections ``A0 (max_in, r)`` and
    ``B0 (r, max_out)`` are frozen and stored once in ``lora["__shared__"]``, sliced
    to each kernel's size.
    """

    d: jax.Array
    b: jax.Array
    fan_in: int = _static()
    scale: float = _static(default=1.0)
    layout: str = _static(default="io")

    def lower(self, shared):
        a0, b0 = shared["A0"], shared["B0"]
        return LowRank(
            a0[: self.fan_in] * self.d, b0[:, : self.b.shape[-1]] * self.b, scale=self.scale, layout=self.layout
        )

    def field_axes(self):
        return {"d": "r", "b": "O"}


# two kernels of different shapes that share the projections: max_in = 6, max_out = 8
SHARED_PARAMS = {
    "q": {"kernel": jax.random.normal(jax.random.key(11), (6, 4)) / 2, "bias": jnp.zeros(4)},
    "v": {"kernel": jax.random.normal(jax.random.key(12), (4, 8)) / 2, "bias": jnp.zeros(8)},
}
SHARED_SPEC = LoraSpec(rank=R, targets=["q", "v"])
X_SHARED = jax.random.normal(jax.random.key(13), (5, 6))


def _shared_lora(key=0):
    ks = jax.random.split(jax.random.key(key), 6)
    node = lambda kd, kb, kernel: SharedProjection(  # noqa: E731
        jax.random.uniform(kd, (R,), minval=0.5, maxval=1.5),
        jax.random.normal(kb, (kernel.shape[1],)),
        fan_in=kernel.shape[0],
        scale=0.75,
    )
    return {
        "q": {"kernel": node(ks[0], ks[1], SHARED_PARAMS["q"]["kernel"])},
        "v": {"kernel": node(ks[2], ks[3], SHARED_PARAMS["v"]["kernel"])},
        lora_jax.SHARED: {"A0": jax.random.normal(ks[4], (6, R)), "B0": jax.random.normal(ks[5], (R, 8))},
    }


def _shared_expected(lora, path):
    """The float64 closed form ``W + scale * (A0[:in] diag(d)) @ (B0[:, :out] diag(b))``."""
    node, w = lora[path]["kernel"], SHARED_PARAMS[path]["kernel"]
    a0, b0 = f64(lora[lora_jax.SHARED]["A0"]), f64(lora[lora_jax.SHARED]["B0"])
    n_in, n_out = w.shape
    return f64(w) + node.scale * (a0[:n_in] * f64(node.d)[None, :]) @ (b0[:, :n_out] * f64(node.b)[None, :])


def _shared_model(p, x):
    h = jnp.tanh(x @ p["q"]["kernel"] + p["q"]["bias"])
    return jnp.sum(jnp.sin(h @ p["v"]["kernel"] + p["v"]["bias"]))


def _assert_trees_equal(got, want):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for x, y in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_shared_section_applies_and_merges_against_float64_closed_form():
    lora = _shared_lora()
    for fn in (apply_lora, jax.jit(apply_lora), merge):
        out = fn(SHARED_PARAMS, lora)
        for path in ("q", "v"):
            np.testing.assert_allclose(f64(out[path]["kernel"]), _shared_expected(lora, path), rtol=1e-6, atol=1e-6)
    back = unmerge(merge(SHARED_PARAMS, lora), lora)
    for path in ("q", "v"):
        np.testing.assert_allclose(f64(back[path]["kernel"]), f64(SHARED_PARAMS[path]["kernel"]), atol=1e-6)


@pytest.mark.parametrize("strategy", ["factored", "dense"])
def test_shared_section_runs_factored_with_the_same_values_and_gradients_and_no_shared_gradient(strategy):
    lora = _shared_lora()
    ref = jax.jit(jax.value_and_grad(lambda lo: _shared_model(apply_lora(SHARED_PARAMS, lo), X_SHARED)))(lora)
    wrapped = lora_jax.factored(_shared_model, strategy=strategy)
    got = jax.jit(jax.value_and_grad(lambda lo: wrapped(SHARED_PARAMS, lo, X_SHARED)))(lora)
    # the value against the float64 closed form, to float32 rounding of its terms (the two float32 computations sum
    # in different orders and may differ from each other by twice that)
    wq, wv = _shared_expected(lora, "q"), _shared_expected(lora, "v")
    terms = np.sin(np.tanh(f64(X_SHARED) @ wq) @ wv)
    for value in (got[0], ref[0]):
        np.testing.assert_allclose(f64(value), terms.sum(), rtol=0, atol=2e-7 * np.abs(terms).sum())
    for path in ("q", "v"):
        for name in ("d", "b"):
            g, r = getattr(got[1][path]["kernel"], name), getattr(ref[1][path]["kernel"], name)
            # float32 sums in another order: an entry far smaller than the others is off by ~1e-7 of their size
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * max(1.0, float(np.abs(r).max())))
            assert np.abs(np.asarray(r)).sum() > 0, (path, name)  # d and b train
    for grads in (got[1], ref[1]):
        for name in ("A0", "B0"):  # frozen by definition: stop_gradient in the lowering
            assert not np.asarray(grads[lora_jax.SHARED][name]).any(), name


def test_shared_section_goes_to_the_frozen_part_of_split_and_combine_joins_it():
    lora = _shared_lora()
    trainable, frozen = lora_jax.split(lora)
    assert lora_jax.SHARED not in trainable and frozen[lora_jax.SHARED] is lora[lora_jax.SHARED]
    for path in ("q", "v"):
        t, f = trainable[path]["kernel"], frozen[path]["kernel"]
        assert t.d is lora[path]["kernel"].d and t.b is lora[path]["kernel"].b and (f.d, f.b) == (None, None)
    back = lora_jax.combine(trainable, frozen)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(lora)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(lora), strict=True):
        assert x is y
    # a step on the trainable part only: the shared projections are not in it and stay as they are
    grads = jax.grad(lambda t: _shared_model(apply_lora(SHARED_PARAMS, lora_jax.combine(t, frozen)), X_SHARED))(
        trainable
    )
    tx = optax.adam(1e-2)
    updates, _ = tx.update(grads, tx.init(trainable), trainable)
    stepped = lora_jax.combine(optax.apply_updates(trainable, updates), frozen)
    assert stepped[lora_jax.SHARED] is lora[lora_jax.SHARED]
    assert not np.array_equal(stepped["q"]["kernel"].d, lora["q"]["kernel"].d)


def test_only_adapters_keeps_no_state_and_gives_no_update_for_the_shared_section():
    lora = _shared_lora()
    tx = lora_jax.only_adapters(optax.adam(1e-2))
    state = tx.init(lora)
    trained = 2 * (R + 4) + 2 * (R + 8)  # adam's mu and nu for d and b of both nodes
    assert sum(x.size for x in jax.tree_util.tree_leaves(state)) == trained + 1  # + count
    grads = jax.tree_util.tree_map(jnp.ones_like, lora)  # a gradient even where there is none, to show it is dropped
    updates, _ = tx.update(grads, state, lora)
    for name in ("A0", "B0"):
        assert not np.asarray(updates[lora_jax.SHARED][name]).any(), name
    assert np.asarray(updates["q"]["kernel"].d).all()


def test_shared_section_round_trips_through_orbax_stored_once(tmp_path):
    lora = _shared_lora()
    path = lora_jax.save_adapter(tmp_path / "ckpt", lora, SHARED_SPEC)
    meta = lora_jax.read_adapter_meta(path)
    assert {k: v["shape"] for k, v in meta["shared"].items()} == {"A0": [6, R], "B0": [R, 8]}
    assert all(set(e["arrays"]) == {"d", "b"} for e in meta["adapters"].values())  # not once per node
    abstract = jax.eval_shape(lambda: lora)
    for kwargs in ({}, {"params": SHARED_PARAMS}, {"target": abstract, "params": SHARED_PARAMS}):
        target = kwargs.pop("target", None)
        back, spec = lora_jax.load_adapter(path, target, spec=SHARED_SPEC, **kwargs)
        assert spec == SHARED_SPEC and type(back["q"]["kernel"]) is SharedProjection
        assert back["v"]["kernel"].fan_in == 4
        _assert_trees_equal(back, lora)


def test_load_with_params_checks_kernel_shapes_through_the_shared_section(tmp_path):
    path = lora_jax.save_adapter(tmp_path / "ckpt", _shared_lora(), SHARED_SPEC)
    wrong = {**SHARED_PARAMS, "v": {"kernel": jnp.zeros((4, 7)), "bias": jnp.zeros(7)}}
    with pytest.raises(ValueError, match=r"shape mismatch at v/kernel \(adapter fits \(4, 8\), params hold \(4, 7\)\)"):
        lora_jax.load_adapter(path, params=wrong)


def test_a_checkpoint_whose_shared_records_are_missing_names_the_path(tmp_path):
    import json
    import shutil

    path = lora_jax.save_adapter(tmp_path / "ckpt", _shared_lora(), SHARED_SPEC)
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    meta_file = broken / "adapter_meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["shared"]
    meta_file.write_text(json.dumps(meta))
    # format 3 checksums the records: the edit is caught first, naming the record
    with pytest.raises(ValueError, match=r"adapter_meta/metadata: expected the record of the shared section to match"):
        lora_jax.load_adapter(broken, params=SHARED_PARAMS)
    # a format-2 record (no record checksums) reaches the node, which names its path
    meta["version"] = 2
    del meta["checksums"]
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"q/kernel: the 'test-shared-projection' node does not lower with the shared"):
        lora_jax.load_adapter(broken, params=SHARED_PARAMS)


def test_summary_counts_the_shared_arrays_once_as_frozen():
    s = lora_jax.summary(SHARED_PARAMS, _shared_lora())
    assert [(r.path, r.kernel_shape, r.rank, r.params) for r in s.rows] == [
        ("q/kernel", (6, 4), R, R + 4),
        ("v/kernel", (4, 8), R, R + 8),
    ]
    assert s.trainable_params == 2 * R + 4 + 8
    assert s.frozen_params == 6 * R + R * 8  # A0 and B0, once for both nodes
    assert s.total_params == 6 * 4 + 4 + 4 * 8 + 8 + s.trainable_params + s.frozen_params


def test_shared_section_gets_replicated_shardings_also_for_each_part_of_split():
    lora = _shared_lora()
    specs = {"q": {"kernel": P(None, "model")}, "v": {"kernel": P("model", None)}}
    sh = lora_jax.adapter_shardings(specs, lora)
    q, v = sh["q"]["kernel"], sh["v"]["kernel"]
    assert (q.d, q.b, v.d, v.b) == (P(), P("model"), P(), P())
    assert sh[lora_jax.SHARED] == {"A0": P(), "B0": P()}  # replicated, in the form the nodes got
    # each part of split gives the shardings of that part: its holes stay None
    for part, want in zip(lora_jax.split(lora), lora_jax.split(sh), strict=True):
        got = lora_jax.adapter_shardings(specs, part)
        assert jax.tree_util.tree_structure(got, is_leaf=lambda x: isinstance(x, P)) == jax.tree_util.tree_structure(
            want, is_leaf=lambda x: isinstance(x, P)
        )
        assert got == want
    mesh = jax.make_mesh((1,), ("model",))
    named = lora_jax.adapter_shardings(specs, lora, mesh=mesh)
    assert named[lora_jax.SHARED]["A0"] == NamedSharding(mesh, P())
    assert named["q"]["kernel"].b == NamedSharding(mesh, P("model"))


def test_inspect_prints_a_checkpoint_whose_nodes_read_the_shared_section(tmp_path, capsys):
    from lora_jax._cli import main

    path = lora_jax.save_adapter(tmp_path / "ckpt", _shared_lora(), SHARED_SPEC)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in out[3:-1]}
    assert rows["q/kernel"][3:6] == ["6x4", "io", str(R)] and rows["v/kernel"][3:6] == ["4x8", "io", str(R)]
    assert out[-1].startswith(f"adapter params: {2 * R + 4 + 8:,} trainable + {6 * R + R * 8:,} frozen ||")
