"""init_lora: distributions and scaling as in PEFT, keys per leaf, init from shapes, the no-op default, summary."""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import f64, kaiming_bound
from _small_models import gpt_config, gpt_forward, gpt_params, gpt_shapes, lora_axes, random_like, tokens_for

import lora_jax
from lora_jax import LoraSpec, Trainable, adapter_items, apply_lora, init_lora, summary

KERNELS = {  # path -> (shape, layout); layouts as flax writes these kernels
    "dense/kernel": ((256, 64), "io"),
    "conv/kernel": ((3, 3, 16, 32), "iiio"),  # fan-in 3*3*16 = 144, as PEFT's Conv2d
    "attn/out/kernel": ((4, 16, 48), "iio"),  # fan-in heads*head_dim = 64
    "attn/query/kernel": ((48, 4, 16), "ioo"),  # fan-in 48
    "stack/mlp/kernel": ((3, 100, 40), "bio"),  # fan-in 100: the layer axis is not an input axis
}
AXES = {"conv": "iiio", "out": "iio", "query": "ioo", "stack": "bio"}


def rbg_key(seed: int) -> jax.Array:
    """An "rbg" PRNG key: the same code paths as the default threefry key, but its random kernels
    compile several times faster on CPU, which matters for the large tensors the distribution tests draw."""
    return jax.random.key(seed, impl="rbg")


def kernels(dtype=jnp.float32) -> dict:
    return random_like(
        lora_jax.targets._paths.nest({p: jax.ShapeDtypeStruct(s, dtype) for p, (s, _) in KERNELS.items()})
    )


@pytest.fixture(scope="module")
def kaiming_lora():
    return init_lora(rbg_key(0), kernels(), LoraSpec(rank=8, targets=".*", axes=AXES))


def test_kaiming_uniform_a_within_1_over_sqrt_fan_in_and_zero_b(kaiming_lora):
    items = adapter_items(kaiming_lora)
    assert set(items) == set(KERNELS)
    for path, (shape, layout) in KERNELS.items():
        node = items[path]
        assert node.layout == layout and node.kernel_shape == shape
        fan_in = math.prod(s for s, c in zip(shape, layout, strict=True) if c == "i")
        bound = kaiming_bound(fan_in)
        assert math.isclose(bound, 1 / math.sqrt(fan_in))
        a = f64(node.a)
        assert np.abs(a).max() <= bound, path
        assert np.abs(a).max() > 0.95 * bound, path  # the whole interval is used
        assert abs(a.mean()) < 0.1 * bound, path
        np.testing.assert_allclose(a.std(), bound / math.sqrt(3), rtol=0.1, err_msg=path)  # uniform(-b, b)
        assert not np.any(f64(node.b)), f"{path}: B must start at zero"


def test_stacked_layers_get_independent_adapters(kaiming_lora):
    a = f64(kaiming_lora["stack"]["mlp"]["kernel"].a)
    assert a.shape == (3, 100, 8)
    assert not np.allclose(a[0], a[1]) and not np.allclose(a[1], a[2])


@pytest.mark.usefixtures("strict_promotion")
def test_gaussian_init_has_std_1_over_r_and_zero_b():
    lora = init_lora(rbg_key(1), kernels(), LoraSpec(rank=8, targets=["dense", "conv"], axes=AXES, init="gaussian"))
    for node in adapter_items(lora).values():
        a = f64(node.a)
        np.testing.assert_allclose(a.std(), 1 / 8, rtol=0.06)
        assert abs(a.mean()) < 0.01
        assert not np.any(f64(node.b))


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_embedding_init_is_zero_a_and_standard_normal_b(init):
    params = {"tok_embed": {"embedding": jnp.zeros((500, 64))}}
    node = init_lora(rbg_key(2), params, LoraSpec(rank=16, targets=["tok_embed"], init=init))["tok_embed"]["embedding"]
    assert node.kind == "embed" and node.a.shape == (500, 16) and node.b.shape == (16, 64)
    assert not np.any(f64(node.a))
    b = f64(node.b)
    np.testing.assert_allclose(b.std(), 1.0, rtol=0.06)
    assert abs(b.mean()) < 0.06


@pytest.mark.usefixtures("strict_promotion")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_dtype_follows_spec_not_base(dtype):
    lora = init_lora(rbg_key(0), kernels(jnp.bfloat16), LoraSpec(rank=8, targets=["dense"], dtype=dtype))
    node = lora["dense"]["kernel"]
    assert node.a.dtype == node.b.dtype == jnp.dtype(dtype)


@pytest.mark.usefixtures("strict_promotion")
def test_scale_rank_and_alpha_patterns():
    spec = LoraSpec(
        rank=8,
        alpha=16.0,
        targets=".*",
        axes=AXES,
        rank_pattern={"conv": 4, r"attn/.*": 2},
        alpha_pattern={"query": 1.0},
    )
    items = adapter_items(jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, spec), kernels()))
    expected = {  # path: (rank, scale = alpha / rank)
        "dense/kernel": (8, 2.0),
        "conv/kernel": (4, 4.0),
        "attn/out/kernel": (2, 8.0),
        "attn/query/kernel": (2, 0.5),
        "stack/mlp/kernel": (8, 2.0),
    }
    assert {p: (n.rank, n.scale) for p, n in items.items()} == expected
    assert items["attn/query/kernel"].a.shape == (48, 2) and items["attn/query/kernel"].b.shape == (2, 4, 16)


def test_rslora_scales_by_alpha_over_sqrt_r():
    spec = LoraSpec(rank=16, alpha=8.0, targets=["dense", "conv"], axes=AXES, rslora=True, rank_pattern={"conv": 4})
    items = adapter_items(jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, spec), kernels()))
    assert items["dense/kernel"].scale == pytest.approx(8.0 / 4.0)
    assert items["conv/kernel"].scale == pytest.approx(8.0 / 2.0)


def test_same_key_gives_the_same_adapters_and_another_key_differs():
    params = {"small": {"kernel": jnp.ones((6, 5))}, "other": {"kernel": jnp.ones((6, 5))}}
    spec = LoraSpec(rank=2, targets=["small", "other"], init="gaussian")
    one = init_lora(jax.random.key(7), params, spec)
    two = init_lora(jax.random.key(7), params, spec)
    jax.tree.map(np.testing.assert_array_equal, one, two)
    other = init_lora(jax.random.key(8), params, spec)
    assert not np.array_equal(one["small"]["kernel"].a, other["small"]["kernel"].a)
    assert not np.array_equal(one["small"]["kernel"].a, one["other"]["kernel"].a)  # same shape, own key


def test_kernels_of_one_tree_get_independent_keys():
    params = {"one": {"kernel": jnp.ones((256, 64))}, "two": {"kernel": jnp.ones((256, 64))}}
    lora = init_lora(rbg_key(9), params, LoraSpec(rank=8, targets=["one", "two"], init="gaussian"))
    a1, a2 = f64(lora["one"]["kernel"].a).ravel(), f64(lora["two"]["kernel"].a).ravel()
    assert abs(np.corrcoef(a1, a2)[0, 1]) < 0.1  # 2048 pairs: the standard error is 0.022


@pytest.mark.usefixtures("strict_promotion")
def test_adding_a_target_or_reordering_params_does_not_change_the_others():
    params = {"small": {"kernel": jnp.ones((6, 5))}, "other": {"kernel": jnp.ones((6, 5))}}
    spec = LoraSpec(rank=2, targets=["small"], init="gaussian")
    alone = init_lora(jax.random.key(3), params, spec)
    wider = init_lora(jax.random.key(3), params, spec.replace(targets=["small", "other"]))
    np.testing.assert_array_equal(alone["small"]["kernel"].a, wider["small"]["kernel"].a)
    reordered = {"zzz": {"kernel": jnp.ones((6, 5))}, "other": params["other"], "small": params["small"]}
    again = init_lora(jax.random.key(3), reordered, spec.replace(targets=["small", "zzz"]))
    np.testing.assert_array_equal(alone["small"]["kernel"].a, again["small"]["kernel"].a)


def test_init_from_shape_dtype_structs_equals_init_from_arrays():
    cfg = gpt_config()
    spec = LoraSpec(rank=2, targets=".*(kernel|embedding)", axes=lora_axes(cfg), init="gaussian")
    shapes = gpt_shapes(cfg)  # jax.eval_shape(GPT(cfg).init, ...): the model never ran
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    from_shapes = init_lora(rbg_key(5), shapes, spec)
    from_arrays = init_lora(rbg_key(5), gpt_params(cfg), spec)
    assert jax.tree.structure(from_shapes) == jax.tree.structure(from_arrays)
    jax.tree.map(np.testing.assert_array_equal, from_shapes, from_arrays)
    assert len(adapter_items(from_shapes)) == 2 * 6 + 3  # 6 kernels per block, 2 embeddings, lm_head


@pytest.mark.parametrize(("scan", "dtype"), [(False, "float32"), (True, "bfloat16")])
def test_default_init_is_a_noop_on_the_model_output(scan, dtype):
    cfg = gpt_config(scan=scan, dtype=dtype)
    params = jax.tree.map(lambda x: x.astype(dtype), gpt_params(cfg))
    spec = LoraSpec(rank=4, targets=".*(kernel|embedding)", axes=lora_axes(cfg))
    lora = init_lora(rbg_key(0), params, spec)
    kinds = {n.kind for n in adapter_items(lora).values()}
    assert kinds == {"linear", "embed"}
    effective = apply_lora(params, lora)
    jax.tree.map(np.testing.assert_array_equal, effective, params)  # bit for bit
    forward, tokens = gpt_forward(cfg), tokens_for(cfg)
    np.testing.assert_array_equal(forward(effective, tokens), forward(params, tokens))


def test_summary_counts_parameters_and_bytes():
    cfg = gpt_config()
    params = gpt_params(cfg)
    spec = LoraSpec(rank=2, targets=["query", "mlp_in"], axes=lora_axes(cfg), trainable=["lm_head"], dtype="bfloat16")
    lora = init_lora(rbg_key(0), params, spec)
    s = summary(params, lora)
    d, ff, h, hd, v = cfg.d_model, cfg.d_ff, cfg.heads, cfg.head_dim, cfg.vocab
    adapter = cfg.layers * (2 * (d + h * hd) + 2 * (d + ff))  # r * (fan_in + fan_out) per kernel
    head = d * v + v  # lm_head kernel + bias, trained in full (float32)
    base = sum(x.size for x in jax.tree.leaves(params))
    assert s.base_params == base and s.base_bytes == 4 * base
    assert s.trainable_params == adapter + head
    assert s.trainable_bytes == 2 * adapter + 4 * head
    assert s.total_params == base + adapter + head  # full copies count, as PEFT counts modules_to_save
    assert s.trainable_percent == pytest.approx(100 * (adapter + head) / (base + adapter + head))
    rows = {r.path: r for r in s.rows}
    assert len(rows) == 2 * cfg.layers + 2
    q = rows["layers_0/query/kernel"]
    assert (q.kind, q.kernel_shape, q.layout, q.rank, q.params) == ("linear", (d, h, hd), "ioo", 2, 2 * (d + h * hd))
    assert q.adapter_shapes == f"A({d}, 2) B(2, {h}, {hd})"
    assert rows["lm_head/kernel"].kind == "trainable" and isinstance(lora["lm_head"]["kernel"], Trainable)
    text = str(s)
    assert text.splitlines()[0].split() == [
        "path",
        "kind",
        "kernel",
        "layout",
        "rank",
        "scale",
        "adapter",
        "params",
        "bytes",
    ]
    assert f"trainable params: {adapter + head:,} || all params: {base + adapter + head:,}" in text
    assert re.search(r"\nlayers_1/mlp_in/kernel +linear +16x32 +io +2 +4 +A\(16, 2\) B\(2, 32\) +96 +192\n", text)
    assert re.search(r"\nlm_head/kernel +trainable +16x16 +- +- +- +full copy +256 +1,024\n", text)


def test_summary_works_on_shapes_only():
    cfg = gpt_config()
    shapes = gpt_shapes(cfg)
    lora = jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, LoraSpec(rank=2, targets=["mlp_in"])), shapes)
    s = summary(shapes, lora)
    assert s.trainable_params == cfg.layers * 2 * (cfg.d_model + cfg.d_ff)
    assert s.base_params == sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
    assert lora_jax.summary(shapes, lora).rows[0].path == "layers_0/mlp_in/kernel"


def test_paths_whose_31_bit_crc_collides_get_different_adapters():
    # zlib.crc32(p) & 0x7FFFFFFF is equal for these two paths: the former key derivation gave them one A
    paths = ("blk600/dec160/mlp240/kernel", "attn30/mlp821/mlp7/kernel")
    params = {}
    for p in paths:
        node = params
        *parents, leaf = p.split("/")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = jnp.ones((16, 8))
    lora = adapter_items(init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=".*kernel")))
    assert not np.array_equal(lora[paths[0]].a, lora[paths[1]].a)


def test_two_leaves_with_the_same_joined_path_raise_naming_both():
    params = {"a/b": {"kernel": jnp.ones((4, 3))}, "a": {"b": {"kernel": jnp.ones((4, 3))}}}
    with pytest.raises(ValueError, match=r"same parameter path 'a/b/kernel': \['a'\]\['b'\]\['kernel'\] and \['a/b'\]"):
        init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets=".*kernel"))
