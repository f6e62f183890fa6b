"""quantize/dequantize against bitsandbytes on CPU: code books, NF4/FP4 codes and absmax bit for bit, double
quantization within 1e-7, stored bytes, int8/int4 error bounds, bad input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax.quant._codebooks import code_book, dynamic_map

torch = pytest.importorskip("torch")
bnbf = pytest.importorskip("bitsandbytes.functional")

RNG = np.random.default_rng(0)


def _kernel(shape, scale=0.02):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def _torch_weight(kernel: np.ndarray, torch_dtype):
    """The torch Linear weight (out, in) of a flax (in, out) kernel."""
    return torch.tensor(np.ascontiguousarray(kernel.T)).to(torch_dtype)


def _ours(kernel, dtype, **kw):
    return lora_jax.quantize({"k": {"kernel": jnp.asarray(kernel, dtype)}}, **kw)["k"]["kernel"]


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_code_books_equal_bitsandbytes(fmt):
    np.testing.assert_array_equal(code_book(fmt), bnbf.get_4bit_type(fmt, device="cpu").numpy())


def test_dynamic_map_equals_bitsandbytes():
    np.testing.assert_array_equal(dynamic_map(), bnbf.create_dynamic_map().numpy())


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(("shape", "block_size"), [((128, 96), 64), ((200, 64), 64), ((256, 48), 128), ((32, 6), 64)])
def test_codes_and_absmax_are_bitsandbytes_bit_for_bit(fmt, dtype, shape, block_size):
    kernel = _kernel(shape)
    kernel[:3, 0] = 0.0  # exact zeros and ties
    w = _torch_weight(np.asarray(jnp.asarray(kernel, dtype).astype(jnp.float32)), getattr(torch, dtype))
    packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type=fmt, compress_statistics=False)
    q = _ours(kernel, dtype, format=fmt, block_size=block_size, double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize(("shape", "block_size"), [((512, 96), 64), ((64, 600), 64), ((256, 256), 32)])
def test_double_quant_matches_dequantize_4bit(fmt, shape, block_size):
    kernel = _kernel(shape)
    w = _torch_weight(kernel, torch.float32)
    packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type=fmt, compress_statistics=True)
    q = _ours(kernel, "float32", format=fmt, block_size=block_size)
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1), state.absmax.numpy())  # the 8-bit codes
    want = bnbf.dequantize_4bit(packed, state).numpy()
    np.testing.assert_allclose(np.asarray(q.dequantize_view()), want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(np.asarray(q.dequantize()), want.T, rtol=0, atol=1e-7)


def test_without_double_quant_dequantize_is_bitsandbytes_exactly():
    kernel = _kernel((128, 64))
    packed, state = bnbf.quantize_4bit(_torch_weight(kernel, torch.float32), blocksize=64, quant_type="nf4")
    q = _ours(kernel, "float32", double_quant=False)
    np.testing.assert_array_equal(np.asarray(q.dequantize()), bnbf.dequantize_4bit(packed, state).numpy().T)


def test_multi_axis_kernel_blocks_peft_2d_view():
    kernel = _kernel((64, 4, 16))  # (d_model, heads, head_dim): layout "ioo", torch weight (heads*head_dim, d_model)
    q = lora_jax.quantize({"q": {"kernel": jnp.asarray(kernel)}}, axes={"q": "ioo"}, double_quant=False)["q"]["kernel"]
    w = torch.tensor(np.ascontiguousarray(kernel.reshape(64, 64).T))
    packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1), packed.numpy().reshape(-1))
    np.testing.assert_array_equal(
        np.asarray(q.dequantize()), bnbf.dequantize_4bit(packed, state).numpy().T.reshape(kernel.shape)
    )


def test_nf4_double_quant_stores_at_most_0_52_bytes_per_param():
    q = _ours(_kernel((1024, 256)), "bfloat16")
    assert q.nbytes / (1024 * 256) <= 0.52
    assert q.codes.dtype == jnp.uint8 and q.absmax.dtype == jnp.uint8 and q.absmax2.dtype == jnp.float32


@pytest.mark.parametrize(("fmt", "levels"), [("int8", 127), ("int4", 7)])
def test_int_formats_round_to_the_nearest_level_of_the_block_absmax(fmt, levels):
    kernel = _kernel((64, 32), scale=1.0)
    q = _ours(kernel, "float32", format=fmt, block_size=32, double_quant=False)
    view = kernel.T.reshape(-1, 32)
    absmax = np.abs(view).max(-1, keepdims=True)
    err = np.abs(np.asarray(q.dequantize()).T.reshape(-1, 32) - view)
    assert (err <= absmax / levels / 2 * (1 + 1e-5)).all()
    np.testing.assert_array_equal(np.asarray(q.absmax).reshape(-1, 1), absmax)


def test_dequantize_casts_once_to_the_kernel_dtype():
    q = _ours(_kernel((128, 64)), "bfloat16")
    assert lora_jax.dequantize({"k": q})["k"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(q.dequantize(), q.dequantize(jnp.float32).astype(jnp.bfloat16))


def test_quantize_under_jit_equals_eager():
    params = {"dense": {"kernel": jnp.asarray(_kernel((128, 64))), "bias": jnp.zeros(64)}}
    eager, jitted = lora_jax.quantize(params), jax.jit(lora_jax.quantize)(params)
    jax.tree.map(np.testing.assert_array_equal, eager, jitted)
    assert jitted["dense"]["bias"] is not None and isinstance(jitted["dense"]["kernel"], lora_jax.QuantizedKernel)


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match=r"quantize\(format=...\): expected one of 'nf4'.*found str 'nf3'"):
        _ours(_kernel((64, 8)), "float32", format="nf3")


def test_block_size_that_does_not_divide_names_the_path_and_a_fix():
    with pytest.raises(ValueError, match=r"k/kernel: quantize\(block_size=64\).*\(6, 10\).*use block_size=4"):
        _ours(_kernel((10, 6)), "float32")


def test_integer_leaf_targeted_by_name_is_refused():
    with pytest.raises(TypeError, match=r"k/kernel: quantize\(targets=...\): expected a float kernel.*int32"):
        lora_jax.quantize({"k": {"kernel": jnp.ones((64, 8), jnp.int32)}}, targets=["k"])


def test_already_quantized_leaf_is_refused_with_a_hint():
    q = lora_jax.quantize({"k": {"kernel": jnp.asarray(_kernel((64, 8)))}})
    with pytest.raises(
        TypeError, match=r"k/kernel: quantize: expected a float array kernel.*already quantized.*exclude"
    ):
        lora_jax.quantize(q)


def test_targets_that_match_nothing_name_quantize_and_the_nearest_paths():
    with pytest.raises(ValueError, match=r"quantize\(targets=\['nope'\]\) matched no kernel.*dense/kernel"):
        lora_jax.quantize({"dense": {"kernel": jnp.ones((64, 8))}}, targets=["nope"])


def test_a_multi_axis_kernel_without_axes_asks_for_them():
    with pytest.raises(ValueError, match=r"(?s)quantize\(axes=.*q/kernel: kernel of shape \(64, 4, 16\)"):
        lora_jax.quantize({"q": {"kernel": jnp.ones((64, 4, 16))}})


@pytest.mark.parametrize(("kw", "match"), [({"block_size": 63}, "even int"), ({"double_quant": 1}, "True or False")])
def test_bad_options_are_named(kw, match):
    with pytest.raises((TypeError, ValueError), match=rf"quantize\({next(iter(kw))}=...\): expected .*{match}"):
        lora_jax.quantize({"dense": {"kernel": jnp.ones((64, 8))}}, **kw)
