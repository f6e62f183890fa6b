"""Quantized kernels sharded like their float kernels: closed-form specs, the whole-block error, and on 8 simulated
devices (a subprocess) a sharded quantize + apply_lora equal to the single-device one."""

from __future__ import annotations

import subprocess
import sys

import jax.numpy as jnp
import pytest
from _xla_env import xla_env
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.quant._sharding import quantized_partition_specs

Q = lora_jax.quantize({"d": {"kernel": jnp.ones((256, 128))}})["d"]["kernel"]  # torch view (128, 256)


@pytest.mark.parametrize(
    ("spec", "codes"),
    [(P(None, "model"), P("model", None)), (P("model", None), P(None, "model")), (P(), P(None, None))],
)
def test_codes_and_absmax_follow_the_kernel_axes(spec, codes):
    got = quantized_partition_specs(Q, spec, {"model": 4})
    assert got.codes == codes and got.absmax == codes and got.absmax2 == P() and got.offset == P()


def test_a_shard_that_would_split_a_block_is_refused():
    with pytest.raises(
        ValueError, match=r"d/kernel: quantized kernel sharding.*whole blocks of 64.*\(128, 256\) split 1 x 8"
    ):
        quantized_partition_specs(Q, P("model", None), {"model": 8}, "d/kernel")


_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, lora_jax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
params = {"up": {"kernel": jax.random.normal(jax.random.key(0), (256, 512)) * 0.05},
          "down": {"kernel": jax.random.normal(jax.random.key(1), (512, 256)) * 0.05}}
specs = {"up": {"kernel": P(None, "model")}, "down": {"kernel": P("model", None)}}
shard = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
q1 = lora_jax.quantize(params)
qs = jax.device_put(q1, lora_jax.quantized_shardings(q1, shard))
assert qs["up"]["kernel"].codes.sharding.spec == P("model", None), qs["up"]["kernel"].codes.sharding
assert qs["down"]["kernel"].absmax.sharding.spec == P(None, "model")
q_jit = jax.jit(lora_jax.quantize, out_shardings=lora_jax.quantized_shardings(q1, shard))(jax.device_put(params, shard))
jax.tree.map(np.testing.assert_array_equal, q_jit, q1)
lora = lora_jax.init_lora(jax.random.key(2), qs, lora_jax.LoraSpec(rank=4, init="random"))
x = jax.random.normal(jax.random.key(3), (16, 256))
f = lambda p, x: jnp.tanh(x @ p["up"]["kernel"]) @ p["down"]["kernel"]
got = jax.jit(lambda q, l: f(lora_jax.apply_lora(q, l), x))(qs, lora)
want = f(lora_jax.apply_lora(q1, lora), x)
np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
print("QUANT_SHARDED_OK")
"""


def test_quantized_base_on_8_devices_matches_one_device(tmp_path):
    run = subprocess.run([sys.executable, "-c", _SCRIPT], env=xla_env(8), cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert "QUANT_SHARDED_OK" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]
