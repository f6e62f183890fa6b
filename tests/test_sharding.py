"""Sharded adapters: derived shardings (in-process) and 8-device training checks (in a subprocess).

The multi-device checks live in ``tests/sharded/sharded_checks.py`` and run once
per session in a subprocess with ``--xla_force_host_platform_device_count=8``
and a timeout (a hung collective fails the tests instead of hanging CI); each
test below asserts that its check passed and shows that check's output if not.
The subprocess also gets XLA's CPU compile-speed flags: the checks compare
sharded against single-device runs compiled the same way, and most of their
time is compilation.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest
from _xla_env import xla_env
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax import LoraSpec, LoraWeights, Trainable

SCRIPT = pathlib.Path(__file__).parent / "sharded" / "sharded_checks.py"
TIMEOUT_S = 480


# ------------------------------------------------------------------ in-process: derived specs


@pytest.mark.parametrize(
    ("layout", "base", "want_a", "want_b"),
    [
        ("io", P(None, "model"), P(), P(None, "model")),  # column-parallel Dense
        ("io", P("model", None), P("model"), P()),  # row-parallel Dense
        ("io", P("model"), P("model"), P()),  # a short spec is padded with None
        ("ioo", P(None, "model", None), P(), P(None, "model")),  # (d, heads, head_dim), heads sharded
        ("iio", P("model", None, None), P("model"), P()),  # (heads, head_dim, d)
        ("bio", P("stage", None, "model"), P("stage"), P("stage", None, "model")),  # stacked axis kept in both
        ("bioo", P(None, ("data", "model"), None, None), P(None, ("data", "model")), P()),  # multi-axis entry
        ("iiio", P(None, None, "x", "y"), P(None, None, "x"), P(None, "y")),  # Conv2D
    ],
)
def test_adapter_partition_specs_closed_form(layout, base, want_a, want_b):
    assert lora_jax.adapter_partition_specs(base, layout) == (want_a, want_b)


def _tree():
    params = {
        "q": {"kernel": jax.ShapeDtypeStruct((8, 2, 4), jnp.float32)},
        "mlp_out": {"kernel": jax.ShapeDtypeStruct((16, 8), jnp.float32)},
        "head": {"kernel": jax.ShapeDtypeStruct((8, 4), jnp.float32)},
    }
    specs = {"q": {"kernel": P(None, "model", None)}, "mlp_out": {"kernel": P("model", None)}, "head": {"kernel": P()}}
    spec = LoraSpec(rank=2, targets=["q", "mlp_out"], axes={"q": "ioo"})
    return params, specs, jax.eval_shape(lambda: lora_jax.init_lora(jax.random.key(0), params, spec))


def test_adapter_shardings_mirror_the_adapter_tree_and_keep_static_fields():
    _, specs, lora = _tree()
    out = lora_jax.adapter_shardings(specs, lora)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(lora)
    node = out["q"]["kernel"]
    assert isinstance(node, LoraWeights) and (node.a, node.b) == (P(), P(None, "model"))
    assert (node.scale, node.layout) == (lora["q"]["kernel"].scale, "ioo")
    assert (out["mlp_out"]["kernel"].a, out["mlp_out"]["kernel"].b) == (P("model"), P())


def test_trainable_leaf_keeps_the_base_sharding():
    mesh = jax.make_mesh((1,), ("model",))
    lora = {"head": {"kernel": Trainable(jnp.ones((8, 4)))}}
    out = lora_jax.adapter_shardings({"head": {"kernel": P(None, "model")}}, lora, mesh=mesh)
    assert out["head"]["kernel"].value == NamedSharding(mesh, P(None, "model"))


def test_named_shardings_keep_mesh_and_arrays_give_their_own_sharding():
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    params = {"mlp_in": {"kernel": jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P(None, "model")))}}
    lora = lora_jax.init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=["mlp_in"]))
    out = lora_jax.adapter_shardings(params, lora)["mlp_in"]["kernel"]
    assert out.a == NamedSharding(mesh, P()) and out.b == NamedSharding(mesh, P(None, "model"))


@pytest.mark.parametrize("host", [False, True], ids=["device-arrays", "numpy-arrays"])
def test_unsharded_params_give_single_device_adapters_equal_to_init_lora(host):
    params = {"mlp_in": {"kernel": jnp.ones((8, 16))}, "head": {"kernel": jnp.arange(32.0).reshape(8, 4)}}
    if host:
        params = jax.device_get(params)
    spec = LoraSpec(rank=2, targets=["mlp_in"], trainable=["head"], init="random")
    lora = lora_jax.init_lora_sharded(jax.random.key(3), params, spec)
    want = lora_jax.init_lora(jax.random.key(3), params, spec)
    for got, ref in zip(jax.tree_util.tree_leaves(lora), jax.tree_util.tree_leaves(want), strict=True):
        assert got.sharding == jax.sharding.SingleDeviceSharding(jax.devices()[0])
        assert jnp.allclose(got, ref, rtol=3e-7, atol=0)


def test_optimizer_shardings_follow_adapters_and_replicate_the_rest():
    mesh = jax.make_mesh((1,), ("model",))
    params, specs, _ = _tree()
    spec = LoraSpec(rank=2, targets=["q", "mlp_out"], axes={"q": "ioo"})
    lora = lora_jax.init_lora_sharded(jax.random.key(0), params, spec, shardings=specs, mesh=mesh)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
    sh = lora_jax.optimizer_shardings(tx, lora)
    state = jax.jit(tx.init, out_shardings=sh)(lora)
    adam = state[1][0]
    assert adam.mu["q"]["kernel"].b.sharding == NamedSharding(mesh, P(None, "model"))
    assert adam.nu["mlp_out"]["kernel"].a.sharding == NamedSharding(mesh, P("model"))
    assert adam.count.sharding == NamedSharding(mesh, P())


def test_missing_path_names_it_and_the_nearest():
    _, specs, lora = _tree()
    del specs["mlp_out"]
    with pytest.raises(ValueError, match=r"mlp_out/kernel: the adapter tree has this path but the base shardings"):
        lora_jax.adapter_shardings(specs, lora)


def test_too_many_spec_entries_is_an_error():
    _, specs, lora = _tree()
    specs["mlp_out"]["kernel"] = P("model", None, None)
    with pytest.raises(
        ValueError, match=r"mlp_out/kernel: the base partition .*: expected at most 2 entries.*found 3 entries"
    ):
        lora_jax.adapter_shardings(specs, lora)


def test_shape_mismatch_with_base_arrays_is_an_error():
    params, _, lora = _tree()
    params["q"]["kernel"] = jax.ShapeDtypeStruct((8, 2, 5), jnp.float32)
    with pytest.raises(ValueError, match=r"q/kernel: the adapter fits a kernel of shape \(8, 2, 4\)"):
        lora_jax.adapter_shardings(params, lora)


def test_partition_specs_without_mesh_are_an_error_for_init():
    params, specs, _ = _tree()
    spec = LoraSpec(rank=2, targets=["q"], axes={"q": "ioo"})
    with pytest.raises(ValueError, match=r"q/kernel.*no mesh was given"):
        lora_jax.init_lora_sharded(jax.random.key(0), params, spec, shardings=specs)


def test_trainable_leaf_needs_a_value_for_init():
    params, specs, _ = _tree()
    spec = LoraSpec(rank=2, targets=["q"], axes={"q": "ioo"}, trainable=["head"])
    with pytest.raises(ValueError, match=r"head/kernel: LoraSpec\(trainable=...\) selects this leaf"):
        lora_jax.init_lora_sharded(jax.random.key(0), params, spec, shardings=specs, mesh=jax.make_mesh((1,), ("m",)))


# ------------------------------------------------------------------ subprocess: 8 simulated devices


@pytest.fixture(scope="module")
def eight_device_run() -> str:
    """Every check of sharded_checks.py, once, in one subprocess with 8 CPU devices."""
    try:
        proc = subprocess.run(
            [sys.executable, str(SCRIPT)],
            env=xla_env(8),
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            cwd=SCRIPT.parent,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"the 8-device checks did not finish in {TIMEOUT_S} s (a hung collective?); output:\n{out}")
    return proc.stdout + proc.stderr


def _check(output: str, name: str) -> None:
    if re.search(rf"^PASSED {name}$", output, flags=re.M):
        return
    pytest.fail(f"check {name!r} did not pass in the 8-device subprocess; its output:\n{output[-6000:]}")


def test_init_creates_adapters_already_sharded_with_derived_shardings(eight_device_run):
    _check(eight_device_run, "init")


def test_megatron_2d_mesh_training_equals_single_device_for_apply_lora_and_factored(eight_device_run):
    _check(eight_device_run, "train")


def test_lora_fa_trainable_part_trains_sharded_with_optimizer_shardings_and_a_never_moves(eight_device_run):
    _check(eight_device_run, "frozen_train")


def test_pmap_data_parallel_loop_equals_single_device(eight_device_run):
    _check(eight_device_run, "pmap")


def test_shard_map_data_parallel_loop_equals_single_device(eight_device_run):
    _check(eight_device_run, "shard_map")


def test_orbax_restore_onto_other_mesh_shapes(eight_device_run):
    _check(eight_device_run, "orbax")


def test_optimizer_shardings_accepts_unconstrained_adapters():
    mesh = jax.make_mesh((1,), ("model",))
    params = {n: {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)} for n in ("a", "b")}
    specs = {"a": {"kernel": P(None, "model")}, "b": {"kernel": None}}  # "b" has no placement
    spec = LoraSpec(rank=4)
    lora = lora_jax.init_lora_sharded(jax.random.key(0), params, spec, shardings=specs, mesh=mesh)
    derived = lora_jax.adapter_shardings(specs, lora, mesh=mesh)
    state = jax.jit(
        optax.adam(1e-3).init, out_shardings=lora_jax.optimizer_shardings(optax.adam(1e-3), lora, shardings=derived)
    )(lora)
    assert state[0].mu["a"]["kernel"].b.sharding.spec == P(None, "model")
    assert state[0].mu["b"]["kernel"].b.sharding.spec == P()


def test_each_part_of_split_gets_adapter_shardings_and_the_trainable_part_optimizer_shardings():
    mesh = jax.make_mesh((1,), ("model",))
    params = {
        "mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)},
        "mlp_out": {"kernel": jax.ShapeDtypeStruct((32, 8), jnp.float32)},
        "head": {"kernel": jnp.ones((8, 4))},
    }
    specs = {"mlp_in": {"kernel": P(None, "model")}, "mlp_out": {"kernel": P("model", None)}, "head": {"kernel": P()}}
    spec = LoraSpec(rank=2, targets=["mlp_in", "mlp_out"], trainable=["head"], freeze_a=True)  # LoRA-FA
    lora = lora_jax.init_lora_sharded(jax.random.key(0), params, spec, shardings=specs, mesh=mesh)
    derived = lora_jax.adapter_shardings(specs, lora, mesh=mesh)
    trainable, frozen = lora_jax.split(lora)
    for part, want in zip((trainable, frozen), lora_jax.split(derived), strict=True):
        assert lora_jax.adapter_shardings(specs, part, mesh=mesh) == want  # holes stay None
    tx = optax.adamw(1e-3)
    sh = lora_jax.optimizer_shardings(tx, trainable)
    assert lora_jax.optimizer_shardings(tx, trainable, shardings=lora_jax.split(derived)[0]) == sh
    state = jax.jit(tx.init, out_shardings=sh)(trainable)
    mu = state[0].mu
    assert mu["mlp_in"]["kernel"].a is None and mu["mlp_in"]["kernel"].b.sharding == NamedSharding(
        mesh, P(None, "model")
    )
    assert mu["mlp_out"]["kernel"].b.sharding == NamedSharding(mesh, P())
    assert mu["head"]["kernel"].value.sharding == NamedSharding(mesh, P())
    with pytest.raises(ValueError, match=r"optimizer_shardings: shardings does not have the structure of lora"):
        lora_jax.optimizer_shardings(tx, trainable, shardings=derived)  # the whole tree's, for a part


def test_a_split_part_that_does_not_fit_its_base_is_an_error():
    params = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 32), jnp.float32)}}
    lora = lora_jax.init_lora(jax.random.key(0), params, LoraSpec(rank=2, freeze_a=True))
    trainable, _ = lora_jax.split(lora)
    wrong = {"mlp_in": {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32)}}
    with pytest.raises(ValueError, match=r"mlp_in/kernel: the adapter's arrays \(b\(2, 32\), layout 'io'\) do not fit"):
        lora_jax.adapter_shardings(wrong, trainable)
