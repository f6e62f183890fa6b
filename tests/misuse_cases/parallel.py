"""Misuse cases for ``init_lora_sharded``, ``adapter_shardings``, ``optimizer_shardings``, ``adapter_partition_specs``.

JAX in the test process has one CPU device: the logic runs on a 1-device mesh, and sizes a mesh does not divide
on an ``AbstractMesh`` (shapes only, no devices).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_jax import (
    LoraSpec,
    adapter_partition_specs,
    adapter_shardings,
    init_lora,
    init_lora_sharded,
    optimizer_shardings,
)

MESH = jax.make_mesh((1,), ("model",))
TWO = AbstractMesh((2,), ("model",))  # a 2-way mesh, for the sizes it must divide
PARAMS = {"dense": {"kernel": jax.ShapeDtypeStruct((4, 3), jnp.float32)}, "out": {"kernel": jnp.ones((3, 2))}}
SPEC = LoraSpec(rank=2, targets=["dense", "out"])
SPECS = {"dense": {"kernel": P(None, "model")}, "out": {"kernel": P("model", None)}}
LORA = init_lora(jax.random.key(0), {"dense": {"kernel": jnp.ones((4, 3))}, "out": {"kernel": jnp.ones((3, 2))}}, SPEC)
SHARDED = init_lora_sharded(jax.random.key(0), PARAMS, SPEC, shardings=SPECS, mesh=MESH)


def specs(**changes):
    return {**SPECS, **{k: {"kernel": v} for k, v in changes.items()}}


def init(shardings, mesh=MESH, key=None, params=PARAMS):
    return init_lora_sharded(jax.random.key(0) if key is None else key, params, SPEC, shardings=shardings, mesh=mesh)


_UNKNOWN = (
    r"dense/kernel: the base partition P\(None, 'data'\): expected mesh axis names among \('model',\), found 'data'"
)
_TOO_MANY = r"dense/kernel: the base partition P\(None, None, 'model'\): expected at most 2 entries.*found 3 entries"
_NOT_DIVIDED = r"dense/kernel/b: axis 1 .*expected a size divisible by 2.*found size 3 \(shape \(2, 3\)\)"

CASES = [
    # adapter_partition_specs
    (
        "partition_specs_too_many_entries",
        lambda: adapter_partition_specs(P(None, "model", None), "io"),
        ValueError,
        r"adapter_partition_specs\(spec=\.\.\.\): the base partition .*expected at most 2 entries.*found 3",
    ),
    (
        "partition_specs_str_spec",
        lambda: adapter_partition_specs("model", "io"),
        TypeError,
        r"adapter_partition_specs\(spec=\.\.\.\): expected a PartitionSpec, found str 'model'",
    ),
    (
        "partition_specs_unknown_layout_letters",
        lambda: adapter_partition_specs(P(None, "model"), "xy"),
        ValueError,
        r"adapter_partition_specs\(layout=\.\.\.\): expected a string of the letters b, i, o, found str 'xy'",
    ),
    (
        "partition_specs_arguments_swapped",
        lambda: adapter_partition_specs("io", P(None, "model")),
        TypeError,
        r"spec=\.\.\.\): expected a PartitionSpec, found str 'io'",
    ),
    # adapter_shardings
    (
        "shardings_too_many_entries",
        lambda: adapter_shardings(specs(dense=P(None, None, "model")), LORA),
        ValueError,
        _TOO_MANY,
    ),
    (
        "shardings_tree_misses_a_path",
        lambda: adapter_shardings({"dense": SPECS["dense"]}, LORA),
        ValueError,
        r"out/kernel: the adapter tree has this path but the base shardings do not \(nearest: dense/kernel\)",
    ),
    (
        "shardings_of_other_params",
        lambda: adapter_shardings(
            {"dense": {"kernel": jax.ShapeDtypeStruct((5, 3), jnp.float32)}, "out": SPECS["out"]}, LORA
        ),
        ValueError,
        r"dense/kernel: the adapter fits a kernel of shape \(4, 3\), but the base leaf has shape \(5, 3\)",
    ),
    (
        "shardings_unknown_mesh_axis",
        lambda: adapter_shardings(specs(dense=P(None, "data")), LORA, mesh=MESH),
        ValueError,
        _UNKNOWN,
    ),
    ("shardings_size_not_divided", lambda: adapter_shardings(SPECS, LORA, mesh=TWO), ValueError, _NOT_DIVIDED),
    (
        "shardings_named_size_not_divided",
        lambda: adapter_shardings(
            {"dense": {"kernel": NamedSharding(TWO, P(None, "model"))}, "out": SPECS["out"]}, LORA
        ),
        ValueError,
        _NOT_DIVIDED,
    ),
    (
        "shardings_str_leaf",
        lambda: adapter_shardings(specs(dense="model"), LORA),
        TypeError,
        r"dense/kernel: the base sharding: expected a PartitionSpec, a jax.sharding.Sharding.*found str 'model'",
    ),
    (
        "shardings_mesh_is_a_name",
        lambda: adapter_shardings(SPECS, LORA, mesh="model"),
        TypeError,
        r"adapter_shardings\(mesh=\.\.\.\): expected a jax.sharding.Mesh or None, found str 'model'",
    ),
    (
        "shardings_and_lora_swapped",
        lambda: adapter_shardings(LORA, SPECS),
        TypeError,
        r"adapter_shardings\(lora=\.\.\.\): expected an adapter tree.*found P.* at dense/kernel.*"
        r"adapter_shardings\(shardings, lora, mesh=\.\.\.\)",
    ),
    # init_lora_sharded
    (
        "init_partition_specs_without_mesh",
        lambda: init(SPECS, mesh=None),
        ValueError,
        r"dense/kernel/a: init_lora_sharded\(mesh=\.\.\.\): expected a mesh.*PartitionSpecs, found mesh=None",
    ),
    ("init_unknown_mesh_axis", lambda: init(specs(dense=P(None, "data"))), ValueError, _UNKNOWN),
    ("init_too_many_entries", lambda: init(specs(dense=P(None, None, "model"))), ValueError, _TOO_MANY),
    ("init_size_not_divided", lambda: init(SPECS, mesh=TWO), ValueError, _NOT_DIVIDED),
    (
        "init_key_and_params_swapped",
        lambda: init_lora_sharded(PARAMS, jax.random.key(0), SPEC, shardings=SPECS, mesh=MESH),
        TypeError,
        r"init_lora_sharded\(key=\.\.\.\): expected a PRNG key of shape \(\), found dict",
    ),
    (
        "init_mesh_is_a_tuple",
        lambda: init(SPECS, mesh=(1,)),
        TypeError,
        r"init_lora_sharded\(mesh=\.\.\.\): expected a jax.sharding.Mesh or None, found tuple \(1,\)",
    ),
    (
        "init_params_leaf_not_an_array",
        lambda: init(SPECS, params={"dense": {"kernel": "w"}, "out": PARAMS["out"]}),
        TypeError,
        r"init_lora_sharded\(params=\.\.\.\) at dense/kernel: expected an array or a ShapeDtypeStruct, found str 'w'",
    ),
    # optimizer_shardings
    (
        "optimizer_not_a_transformation",
        lambda: optimizer_shardings(optax.adam, SHARDED),
        TypeError,
        r"optimizer_shardings\(tx=\.\.\.\): expected an optax GradientTransformation, found function",
    ),
    (
        "optimizer_and_lora_swapped",
        lambda: optimizer_shardings(SHARDED, optax.adam(1e-3)),
        TypeError,
        r"optimizer_shardings\(tx=\.\.\.\): expected an optax GradientTransformation, found dict.*\(tx, lora\)",
    ),
    (
        "optimizer_state_for_another_tree",
        lambda: optimizer_shardings(optax.multi_transform({"a": optax.sgd(1.0)}, {"other": "a"}), SHARDED),
        ValueError,
        r"optimizer_shardings\(tx=\.\.\.\): expected an optimizer whose init accepts the adapter tree, found tx.init",
    ),
    (
        "optimizer_shardings_tree_does_not_match",
        lambda: optimizer_shardings(optax.adam(1e-3), SHARDED, shardings={"a": NamedSharding(MESH, P())}),
        ValueError,
        r"optimizer_shardings\(shardings=\.\.\.\): expected one sharding per adapter array \(4\).*found 1 sharding",
    ),
    (
        "optimizer_unsharded_adapters",
        lambda: optimizer_shardings(optax.adam(1e-3), LORA),
        ValueError,
        r"optimizer_shardings: no adapter array carries a NamedSharding.*init_lora_sharded",
    ),
]
