"""apply_lora and merge against a float64 NumPy closed form, for every kernel kind.

Kernel shapes come from the real flax modules (``jax.eval_shape`` of linen
``Dense``, ``DenseGeneral``, ``Conv``, ``Embed``, an ``nn.scan`` stack, and an
NNX ``Linear`` through ``nnx.split``), plus plain dict and list pytrees.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import apply_np, bf16_half_ulp, f32_update_error, f64
from _small_models import random_like
from flax import nnx

import lora_jax
from lora_jax import LoraSpec, LoraWeights, adapter_items, apply_lora, init_lora, merge

pytestmark = pytest.mark.usefixtures("strict_promotion")


@dataclasses.dataclass(frozen=True)
class Case:
    """A base parameter tree, the spec that adapts it, and the expected layout of each adapter."""

    make: Callable[[], Any]  # -> params (ShapeDtypeStruct leaves are filled with random values)
    spec: LoraSpec
    layouts: dict[str, str]  # adapted path -> expected layout


def linen_shapes(module: nn.Module, *inputs) -> Any:
    return jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]


class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(5, name="dense")(x), None


def scanned_shapes():
    stack = nn.scan(Scanned, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return linen_shapes(stack(name="layers"), jnp.zeros((2, 5)), None)


def nnx_state():
    model = nnx.eval_shape(lambda: nnx.Linear(6, 5, rngs=nnx.Rngs(0)))
    _, state = nnx.split(model)
    return state


def f32(shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


CASES = {
    "dense": Case(
        lambda: linen_shapes(nn.Dense(6), jnp.zeros((1, 5))), LoraSpec(rank=3, targets=["kernel"]), {"kernel": "io"}
    ),
    "dense_general_ioo": Case(
        lambda: linen_shapes(nn.DenseGeneral((3, 4)), jnp.zeros((1, 5))),
        LoraSpec(rank=2, targets=["kernel"], axes={"kernel": "ioo"}),
        {"kernel": "ioo"},
    ),
    "dense_general_iio": Case(
        lambda: linen_shapes(nn.DenseGeneral(5, axis=(-2, -1)), jnp.zeros((1, 3, 4))),
        LoraSpec(rank=2, targets=["kernel"], axes={"kernel": "iio"}),
        {"kernel": "iio"},
    ),
    "conv_iiio": Case(
        lambda: linen_shapes(nn.Conv(4, (3, 3)), jnp.zeros((1, 6, 6, 2))),
        LoraSpec(rank=3, targets=["kernel"], axes={"kernel": "iiio"}),
        {"kernel": "iiio"},
    ),
    "embed": Case(
        lambda: linen_shapes(nn.Embed(10, 6), jnp.zeros((1,), jnp.int32)),
        LoraSpec(rank=3, targets=["embedding"]),
        {"embedding": "io"},
    ),
    "scan_bio": Case(
        scanned_shapes, LoraSpec(rank=2, targets=["dense"], axes={"dense": "bio"}), {"dense/kernel": "bio"}
    ),
    "nnx_state": Case(nnx_state, LoraSpec(rank=2, targets=["kernel"]), {"kernel": "io"}),
    "plain_dict": Case(
        lambda: {"enc": {"w_q": f32((6, 4)), "w_o": f32((2, 2, 6))}, "norm": f32((6,))},
        LoraSpec(rank=2, targets=r"enc/w_.", axes={"w_o": "iio"}),
        {"enc/w_q": "io", "enc/w_o": "iio"},
    ),
    "list": Case(
        lambda: {"layers": [{"w": f32((4, 3)), "b": f32((3,))}, {"w": f32((3, 4)), "b": f32((4,))}]},
        LoraSpec(rank=2, targets=lambda path, leaf: path.endswith("/w")),
        {"layers/0/w": "io", "layers/1/w": "io"},
    ),
}


def base_params(case: Case, dtype) -> Any:
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), case.make())
    return random_like(shapes, seed=1, std=1.0)


def random_adapters(params: Any, spec: LoraSpec) -> Any:
    """The adapter tree ``init_lora`` builds for ``params``, filled with N(0, 0.5) values.

    The structure comes from ``jax.eval_shape(init_lora ...)``: no eager random
    kernels to compile per shape (init distributions are tested in test_init.py).
    """
    shapes = jax.eval_shape(lambda p: init_lora(jax.random.key(2), p, spec), params)
    return random_like(shapes, seed=2, std=0.5)


MODES = {"apply_lora": apply_lora, "jit_apply_lora": jax.jit(apply_lora), "merge": merge}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(CASES))
def test_effective_weight_matches_float64_closed_form(name, mode, dtype):
    case = CASES[name]
    params = base_params(case, dtype)
    lora = random_adapters(params, case.spec)
    items = adapter_items(lora)
    assert {p: n.layout for p, n in items.items()} == case.layouts
    assert {n.kind for n in items.values()} == ({"embed"} if name == "embed" else {"linear"})

    out = MODES[mode](params, lora)

    assert jax.tree.structure(out) == jax.tree.structure(params)
    flat_in, flat_out = (
        lora_jax.targets._paths.flatten_with_paths(params),
        lora_jax.targets._paths.flatten_with_paths(out),
    )
    for path, w in flat_in.items():
        got = flat_out[path]
        assert got.dtype == w.dtype and got.shape == w.shape, path
        if path not in items:
            np.testing.assert_array_equal(np.asarray(got), np.asarray(w), err_msg=f"{path} is not adapted but changed")
            continue
        node = items[path]
        ref = apply_np(w, node.a, node.b, node.scale, node.layout)
        assert np.abs(ref - f64(w)).max() > 1e-2, "the adapter must change the kernel for this test to mean anything"
        err = np.abs(f64(got) - ref)
        f32_err = f32_update_error(w, node.a, node.b, node.scale, node.layout)
        if dtype == "float32":
            assert np.all(err <= f32_err), (path, float(err.max()))
        else:  # float32 update, one rounding to bfloat16: within half a bfloat16 ulp of the exact value
            assert np.all(err <= bf16_half_ulp(ref) + f32_err), (path, float(err.max()))


def test_adapter_dtype_is_honoured_and_update_is_float32():
    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)}
    spec = LoraSpec(rank=3, targets="w", dtype="bfloat16")
    shapes = jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, spec), params)
    assert shapes["w"].a.dtype == shapes["w"].b.dtype == jnp.bfloat16
    lora = random_adapters(params, spec)
    node = lora["w"]
    assert node.a.dtype == jnp.bfloat16 and node.delta().dtype == jnp.float32
    out = apply_lora(params, lora)["w"]
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(f64(out), apply_np(params["w"], node.a, node.b, node.scale, "io"), rtol=1e-6, atol=1e-6)


def test_delta_matches_closed_form_for_interleaved_batch_axis():
    """A stacked axis need not lead: layout "iob" keeps the layer axis last."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 5, 2)), rng.normal(size=(4, 2, 3))
    node = lora_jax.LoraWeights(a=jnp.asarray(a, jnp.float32), b=jnp.asarray(b, jnp.float32), scale=0.5, layout="iob")
    assert node.kernel_shape == (5, 3, 4)
    expected = 0.5 * np.einsum("lir,lro->iol", a, b)
    np.testing.assert_allclose(f64(node.delta()), expected, rtol=1e-6, atol=1e-6)


def test_apply_does_not_modify_its_inputs():
    params = {"w": jnp.ones((4, 3))}
    lora = random_adapters(params, LoraSpec(rank=2, targets="w"))
    before = jax.tree.map(np.array, (params, lora))
    apply_lora(params, lora)
    merge(params, lora)
    after = jax.tree.map(np.array, (params, lora))
    jax.tree.map(np.testing.assert_array_equal, before, after)


def test_a_negated_adapter_subtracts_its_delta():
    # task arithmetic and weighted combinations give negative scales: W - s·A·B
    rng = np.random.default_rng(3)
    w, a, b = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((5, 4), (5, 2), (2, 4)))
    lora = {"k": LoraWeights(a=a, b=b, scale=-1.5)}
    got = np.asarray(apply_lora({"k": w}, lora)["k"], np.float64)
    np.testing.assert_allclose(got, apply_np(w, a, b, -1.5, "io"), atol=1e-6)
