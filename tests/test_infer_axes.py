"""``infer_axes``: kernel layouts read from how the model uses each kernel."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _reference import apply_np, delta_np, f64

import lora_jax
from lora_jax import LoraSpec, apply_lora, infer_axes, init_lora, merge

D, HEADS, HEAD_DIM, LAYERS = 8, 2, 4, 3


def _axes_of(module: nn.Module, *args) -> tuple[dict[str, str], dict]:
    params = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
    return infer_axes(lambda p, *a: module.apply({"params": p}, *a), params, *args), params


def _x(*shape: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


class _Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        q = nn.DenseGeneral((HEADS, HEAD_DIM), name="q_proj")(x)
        return nn.DenseGeneral(D, axis=(-2, -1), name="o_proj")(jnp.tanh(q))


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return jnp.tanh(nn.Dense(D, name="dense")(h)), None


class _Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
        stack = nn.scan(_Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS)
        return stack(name="stack")(x, None)[0]


class Conv1DStyle(nn.Module):
    """Hugging Face Flax's ``FlaxConv1D``: the kernel is stored ``(out, in)`` and used as ``x @ kernel.T``."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.5), (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.normal(0.5), (self.features,))
        return jax.lax.dot_general(x, kernel.T, (((x.ndim - 1,), (0,)), ((), ()))) + bias


def test_dense_kernel_is_io():
    axes, _ = _axes_of(nn.Dense(3), _x(2, 5))
    assert axes == {"kernel": "io"}  # the 1-D bias is not a kernel


def test_dense_general_query_is_ioo_and_output_projection_is_iio():
    axes, _ = _axes_of(_Attention(), _x(2, 5, D))
    assert axes == {"q_proj/kernel": "ioo", "o_proj/kernel": "iio"}  # the (heads, head_dim) bias is left out


def test_conv_kernel_is_iiio():
    axes, _ = _axes_of(nn.Conv(4, (3, 2)), _x(1, 6, 6, 3))
    assert axes == {"kernel": "iiio"}


def test_scanned_dense_kernel_is_bio():
    axes, _ = _axes_of(_Scanned(), _x(2, D))
    assert axes == {"stack/dense/kernel": "bio"}


def test_kernel_stored_out_in_and_used_through_a_transpose_is_oi():
    axes, _ = _axes_of(Conv1DStyle(5), _x(2, 3))
    assert axes == {"kernel": "oi"}


def test_square_kernel_used_through_a_transpose_is_oi():
    params = {"w": jnp.ones((4, 4))}
    assert infer_axes(lambda p, x: x @ p["w"].T, params, _x(2, 4)) == {"w": "oi"}
    assert infer_axes(lambda p, x: x @ p["w"], params, _x(2, 4)) == {"w": "io"}


def test_kernel_flattened_by_a_reshape_keeps_its_axes():
    params = {"w": jnp.ones((D, HEADS, HEAD_DIM)), "o": jnp.ones((HEADS, HEAD_DIM, D))}

    def fn(p, x):
        h = x @ p["w"].reshape(D, -1)  # (d, heads*head_dim)
        return h.reshape(-1, HEADS, HEAD_DIM).reshape(-1, HEADS * HEAD_DIM) @ p["o"].reshape(-1, D)

    assert infer_axes(fn, params, _x(2, D)) == {"w": "ioo", "o": "iio"}


def test_reshape_that_mixes_kernel_axes_raises_naming_it():
    params = {"w": jnp.ones((4, 6))}
    with pytest.raises(
        ValueError, match=r"w \(shape \(4, 6\)\): cannot be followed through reshape \(4, 6\) -> \(6, 4\)"
    ):
        infer_axes(lambda p, x: x @ p["w"].reshape(6, 4), params, _x(2, 6))


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(jax.jit, id="jit"),
        pytest.param(jax.checkpoint, id="remat"),
        pytest.param(lambda f: jax.custom_jvp(f), id="custom_jvp"),
        pytest.param(lambda f: jax.custom_vjp(f), id="custom_vjp"),
        pytest.param(lambda f: lambda w, x: jax.lax.cond(x.sum() > 0, f, lambda w, x: -f(w, x), w, x), id="cond"),
        pytest.param(lambda f: lambda w, x: jax.lax.fori_loop(0, 2, lambda i, h: f(w, h), x), id="while"),
        pytest.param(lambda f: lambda w, x: jax.lax.scan(lambda h, _: (f(w, h), None), x, None, length=2)[0], id="scan"),
    ],
)  # fmt: skip
def test_kernel_is_followed_into_call_and_control_flow_bodies(wrap):
    inner = wrap(lambda w, x: jnp.tanh(x @ w.astype(jnp.float32).T))
    if isinstance(inner, jax.custom_jvp):
        inner.defjvp(lambda p, t: (inner(*p), t[1]))
    if isinstance(inner, jax.custom_vjp):
        inner.defvjp(lambda w, x: (inner(w, x), None), lambda _, g: (None, g))
    params = {"w": jnp.ones((4, 4), jnp.bfloat16), "stack": jnp.ones((LAYERS, 4, 4))}

    def fn(p, x):
        h = inner(p["w"], x)
        for k in range(LAYERS):
            h = h @ p["stack"][k]  # a stacked kernel indexed by layer
        return h

    assert infer_axes(fn, params, _x(2, 4)) == {"w": "oi", "stack": "bio"}


def test_tied_embedding_used_by_a_gather_and_by_a_transpose_raises_listing_both_uses():
    class Tied(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(11, D, name="embed")
            return embed.attend(nn.Dense(D, name="fc")(embed(tokens)))  # x @ E.T

    with pytest.raises(ValueError, match="1 kernel") as e:
        _axes_of(Tied(), jnp.zeros((2, 3), jnp.int32))
    msg = str(e.value)
    assert "embed/embedding (shape (11, 8)): used with 2 different layouts" in msg
    assert "gather reads 'io'" in msg and "dot_general reads 'oi'" in msg
    assert "fc/kernel" not in msg  # the other kernels are fine


def test_embedding_table_is_io_as_lora_jax_lays_out_embeddings():
    axes, params = _axes_of(nn.Embed(11, D), jnp.zeros((2, 3), jnp.int32))
    assert axes == {"embedding": "io"}
    spec = LoraSpec(rank=2, targets=["embedding"], axes=axes)
    node = init_lora(jax.random.key(0), params, spec)["embedding"]
    assert node.kind == "embed" and node.a.shape == (11, 2) and node.b.shape == (2, D)  # A covers V, B covers D


def test_unused_kernels_are_left_out():
    params = {"used": jnp.ones((4, 3)), "unused": jnp.ones((3, 3)), "table": jnp.ones((5, 4, 2))}
    assert infer_axes(lambda p, x: x @ p["used"], params, _x(2, 4)) == {"used": "io"}


def test_bias_added_to_activations_is_not_a_kernel_use():
    params = {
        "w": jnp.ones((D, HEADS, HEAD_DIM)),
        "b": jnp.ones((HEADS, HEAD_DIM)),
        "next": jnp.ones((HEADS, HEAD_DIM, 3)),
    }
    fn = lambda p, x: jnp.einsum("bhk,hko->bo", jnp.einsum("bd,dhk->bhk", x, p["w"]) + p["b"], p["next"])  # noqa: E731
    assert infer_axes(fn, params, _x(2, D)) == {"w": "ioo", "next": "iio"}


def test_infer_axes_reads_the_same_from_eval_shape_params_as_from_arrays():
    module, x = _Attention(), _x(2, 5, D)
    abstract = jax.eval_shape(module.init, jax.random.key(0), x)["params"]
    concrete = module.init(jax.random.key(0), x)["params"]
    fn = lambda p, x: module.apply({"params": p}, x)  # noqa: E731
    got = infer_axes(fn, abstract, jax.ShapeDtypeStruct(x.shape, x.dtype))
    assert got == infer_axes(fn, concrete, x) == {"q_proj/kernel": "ioo", "o_proj/kernel": "iio"}


def test_non_array_arguments_are_passed_through():
    fn = lambda p, x, *, transpose: x @ (p["w"].T if transpose else p["w"])  # noqa: E731
    assert infer_axes(fn, {"w": jnp.ones((3, 3))}, _x(2, 3), transpose=True) == {"w": "oi"}


def test_exact_path_keys_match_only_their_own_kernel_despite_regex_characters():
    params = {"h.0": {"kernel": jnp.ones((4, 4))}, "hx0": {"kernel": jnp.ones((4, 4))}}
    fn = lambda p, x: x @ p["h.0"]["kernel"].T + x @ p["hx0"]["kernel"]  # noqa: E731
    axes = infer_axes(fn, params, _x(2, 4))
    assert list(axes.items()) == [("h.0/kernel", "oi"), ("hx0/kernel", "io")]  # "h.0/kernel" as a regex matches hx0
    lora = init_lora(jax.random.key(0), params, LoraSpec(rank=2, targets="all-linear", axes=axes))
    assert lora["h.0"]["kernel"].layout == "oi" and lora["hx0"]["kernel"].layout == "io"


def _oi_setup():
    params = Conv1DStyle(5).init(jax.random.key(0), _x(2, 3))["params"]
    fn = lambda p, x: Conv1DStyle(5).apply({"params": p}, x)  # noqa: E731
    spec = LoraSpec(rank=2, alpha=3.0, targets="all-linear", axes=infer_axes(fn, params, _x(2, 3)), init="random")
    return params, fn, spec, init_lora(jax.random.key(1), params, spec)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_apply_lora_on_an_oi_kernel_equals_the_float64_reference(jit):
    params, fn, _, lora = _oi_setup()
    node = lora["kernel"]
    assert node.layout == "oi" and node.a.shape == (3, 2) and node.b.shape == (2, 5)  # A covers the input axis
    got = (jax.jit(apply_lora) if jit else apply_lora)(params, lora)["kernel"]
    np.testing.assert_allclose(
        f64(got), apply_np(params["kernel"], node.a, node.b, node.scale, "oi"), atol=1e-6, rtol=0
    )
    # the model's output is x @ W.T + s * (x @ A) @ B: the closed form of LoRA on the input axis
    x = _x(4, 3, seed=2)
    want = f64(x) @ f64(params["kernel"]).T + f64(params["bias"]) + node.scale * (f64(x) @ f64(node.a)) @ f64(node.b)
    np.testing.assert_allclose(f64(fn(apply_lora(params, lora), x)), want, atol=1e-5, rtol=0)


def test_merge_and_factored_on_an_oi_kernel_equal_the_float64_reference():
    params, fn, _, lora = _oi_setup()
    node = lora["kernel"]
    np.testing.assert_allclose(
        f64(merge(params, lora)["kernel"]), apply_np(params["kernel"], node.a, node.b, node.scale, "oi"), atol=1e-6
    )
    x = _x(4, 3, seed=3)
    want = f64(x) @ (f64(params["kernel"]) + delta_np(node.a, node.b, node.scale, "oi")).T + f64(params["bias"])
    np.testing.assert_allclose(f64(jax.jit(lora_jax.factored(fn))(params, lora, x)), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("model", "want"),
    [
        pytest.param(_Attention(), {"q_proj/kernel": "ioo", "o_proj/kernel": "iio"}, id="dense_general"),
        pytest.param(nn.Conv(4, (3, 3)), {"kernel": "iiio"}, id="conv"),
        pytest.param(_Scanned(), {"stack/dense/kernel": "bio"}, id="nn_scan"),
    ],
)
def test_all_linear_with_inferred_axes_adapts_every_kernel(model, want):
    x = _x(1, 6, 6, 3) if isinstance(model, nn.Conv) else _x(2, D)
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="infer_axes"):  # without layouts: ambiguous
        init_lora(jax.random.key(1), params, LoraSpec(rank=2))
    spec = LoraSpec(rank=2, axes=infer_axes(lambda p, x: model.apply({"params": p}, x), params, x), init="random")
    lora = init_lora(jax.random.key(1), params, spec)
    items = lora_jax.adapter_items(lora)
    assert {p: n.layout for p, n in items.items()} == want
    effective = lora_jax.targets._paths.flatten_with_paths(apply_lora(params, lora))
    base = lora_jax.targets._paths.flatten_with_paths(params)
    for p, n in items.items():
        np.testing.assert_allclose(f64(effective[p]), apply_np(base[p], n.a, n.b, n.scale, n.layout), atol=1e-6)


def test_ambiguous_layout_error_lists_every_kernel_and_offers_infer_axes_not_a_guess():
    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = _Attention(name="attn")(x)
            return nn.Conv(4, (3, 3), name="conv")(h[..., None, :]), _Scanned(name="mlp")(h)

    params = jax.eval_shape(Block().init, jax.random.key(0), _x(2, 3, D))["params"]
    with pytest.raises(ValueError) as e:
        init_lora(jax.random.key(0), params, LoraSpec(rank=2))
    msg = str(e.value)
    assert msg.startswith("4 kernel(s) need a layout in LoraSpec(axes={pattern: layout})")
    for path, shape in [
        ("attn/q_proj/kernel", (D, HEADS, HEAD_DIM)),
        ("attn/o_proj/kernel", (HEADS, HEAD_DIM, D)),
        ("conv/kernel", (3, 3, D, 4)),
        ("mlp/stack/dense/kernel", (LAYERS, D, D)),
    ]:
        assert f"{path}: kernel of shape {shape} has {len(shape)} axes" in msg
    assert "LoraSpec(axes=lora_jax.infer_axes(fn, params, *example_args))" in msg
    assert "'i' input" in msg and "'o' output" in msg and "'b' stacked layer" in msg
    assert "axes={'o_proj'" not in msg and "axes={'q_proj'" not in msg  # no per-kernel guess
    axes = infer_axes(lambda p, x: Block().apply({"params": p}, x), params, _x(2, 3, D))
    assert axes["attn/o_proj/kernel"] == "iio"  # what the old error guessed as 'ioo'
    init_lora(jax.random.key(0), params, LoraSpec(rank=2, axes=axes))


def test_ambiguous_layouts_are_reported_before_a_rank_limit_read_from_them():
    params = {"o_proj": {"kernel": jnp.ones((2, 4, 8))}, "fc": {"kernel": jnp.ones((8, 3))}}
    with pytest.raises(ValueError, match=r"^1 kernel\(s\) need a layout"):
        init_lora(jax.random.key(0), params, LoraSpec(rank=4))  # fc's rank 4 > 3 is reported once layouts are known


class _GPT2Style(nn.Module):
    """Two ``FlaxConv1D``-style kernels: a square ``(D, D)`` and a non-square ``(3, D)``, both stored ``(out, in)``."""

    @nn.compact
    def __call__(self, x):
        return Conv1DStyle(3, name="c_proj")(jnp.tanh(Conv1DStyle(D, name="c_attn")(x)))


def _torch_twin(params, conv1d: bool):
    """The torch model: ``nn.Linear`` (weight ``(out, in)`` = the kernel) or transformers' ``Conv1D`` (``(in, out)``)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            make = (lambda i, o: Conv1D(o, i)) if conv1d else torch.nn.Linear
            self.c_attn, self.c_proj = make(D, D), make(D, 3)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_attn(x)))

    model = Model()
    state = {}
    for name in ("c_attn", "c_proj"):
        kernel = np.array(params[name]["kernel"], np.float32)
        state[f"{name}.weight"] = torch.from_numpy(np.array(kernel.T if conv1d else kernel))
        state[f"{name}.bias"] = torch.from_numpy(np.array(params[name]["bias"], np.float32))
    model.load_state_dict(state)
    return model.eval()


def _peft_outputs(params, path, conv1d: bool, x) -> tuple[np.ndarray, object]:
    import peft
    import torch

    model = peft.PeftModel.from_pretrained(_torch_twin(params, conv1d), str(path)).eval()
    with torch.no_grad():
        return model(torch.from_numpy(np.array(x))).numpy(), model


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d_fan_in_fan_out"])
def test_peft_export_of_oi_kernels_loads_in_torch_with_equal_outputs(conv1d, tmp_path):
    import copy

    x = _x(2, D)
    params = _GPT2Style().init(jax.random.key(0), x)["params"]
    axes = infer_axes(lambda p, x: _GPT2Style().apply({"params": p}, x), params, x)
    assert axes == {"c_attn/kernel": "oi", "c_proj/kernel": "oi"}
    spec = LoraSpec(rank=2, alpha=4.0, axes=axes, init="random")
    lora = init_lora(jax.random.key(1), params, spec)
    out = lora_jax.export_peft(
        tmp_path / "a", lora, spec, fan_in_fan_out=conv1d
    )  # PEFT warns (an error here) on a mismatch
    got, model = _peft_outputs(params, out, conv1d, x)
    want = _GPT2Style().apply({"params": apply_lora(params, lora)}, x)
    assert np.abs(np.asarray(want) - np.asarray(_GPT2Style().apply({"params": params}, x))).max() > 1e-2
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=0)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()  # PEFT merges with fan_in_fan_out
    ours = merge(params, lora)
    for name in ("c_attn", "c_proj"):
        weight = merged[f"{name}.weight"].numpy()
        np.testing.assert_allclose(weight.T if conv1d else weight, np.asarray(ours[name]["kernel"]), atol=2e-6, rtol=0)
    back, spec2 = lora_jax.import_peft(out, params, axes=axes)
    assert dict(spec2.axes) == {"^c_attn/kernel$": "oi", "^c_proj/kernel$": "oi"}
    for name in ("c_attn", "c_proj"):
        assert back[name]["kernel"].layout == "oi"
        np.testing.assert_array_equal(np.asarray(back[name]["kernel"].a), np.asarray(lora[name]["kernel"].a))
        np.testing.assert_array_equal(np.asarray(back[name]["kernel"].b), np.asarray(lora[name]["kernel"].b))


def test_peft_export_of_a_square_out_in_kernel_taken_as_io_is_transposed_in_torch(tmp_path):
    """The defect infer_axes fixes: without a layout a square (out, in) kernel is taken as Dense's (in, out)."""
    x = _x(2, D)
    params = _GPT2Style().init(jax.random.key(0), x)["params"]
    spec = LoraSpec(rank=2, alpha=4.0, targets=["c_attn"], init="random")  # no axes: "io" assumed
    lora = init_lora(jax.random.key(1), params, spec)
    got, _ = _peft_outputs(params, lora_jax.export_peft(tmp_path / "a", lora, spec), False, x)
    want = np.asarray(_GPT2Style().apply({"params": apply_lora(params, lora)}, x))
    assert np.abs(got - want).max() > 1e-3


def test_export_with_fan_in_fan_out_refuses_a_kernel_trained_in_full(tmp_path):
    params = _GPT2Style().init(jax.random.key(0), _x(2, D))["params"]
    spec = LoraSpec(rank=2, targets=["c_attn"], trainable=["c_proj"], axes={"c_attn/kernel": "oi"})
    lora = init_lora(jax.random.key(1), params, spec)
    with pytest.raises(ValueError, match=r"c_proj/kernel: a kernel trained in full .* fan_in_fan_out=True"):
        lora_jax.export_peft(tmp_path / "a", lora, spec, fan_in_fan_out=True)


def test_nnx_state_paths_match_the_paths_lora_jax_resolves():
    from _small_models import NnxMLP
    from flax import nnx

    graphdef, state = nnx.split(NnxMLP(11, D, 16, rngs=nnx.Rngs(0)))  # its state holds PRNG keys too
    axes = infer_axes(lambda s, t: nnx.merge(graphdef, s)(t), state, jnp.zeros((2, 3), jnp.int32))
    assert axes == {"embed/embedding": "io", "head/kernel": "io", "hidden/kernel": "io"}
    lora = init_lora(jax.random.key(0), state, LoraSpec(rank=2, targets=["hidden", "embed"], axes=axes))
    assert set(lora_jax.adapter_items(lora)) == {"embed/embedding", "hidden/kernel"}
