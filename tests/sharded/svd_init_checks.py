"""``init_lora_and_base`` on sharded params, run in a subprocess with 8 simulated CPU devices.

``tests/test_svd_init.py`` runs

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded/svd_init_checks.py

and asserts it ends with ``PASSED svd_init``. For PiSSA, its randomized
variant and OLoRA, on the GPT decoder with Megatron shardings (plain and
``nn.scan``-stacked layers): every residual kernel keeps its kernel's
sharding, every adapter array has its derived sharding, the values equal the
single-device init, and ``apply_lora(residual, lora)`` gives the params back. LoftQ: the quantized residual
is in the shardings ``quantized_shardings`` derives from the kernel's, codes equal to the single-device init.
Importing this module has no side effects.
"""

from __future__ import annotations

import jax
import numpy as np
import sharded_checks as S

import lora_jax
from lora_jax.models.gpt import ATTENTION, MLP, lora_axes
from lora_jax.targets._paths import flatten_with_paths


def _deltas(lora):
    return {p: np.asarray(n.delta()) for p, n in lora_jax.adapter_items(lora).items() if hasattr(n, "delta")}


def check_svd_init() -> None:
    mesh = S.auto_mesh((2, 4), ("data", "model"))
    key = jax.random.key(3)
    for scan in (False, True):
        cfg = S.config(scan)
        params = S.init_params(cfg)
        params_sh = S.shard(params, mesh, S.base_specs(params))
        for init in ("pissa", "pissa_niter_2", "olora"):
            spec = lora_jax.LoraSpec(rank=4, alpha=8.0, targets=list(ATTENTION + MLP), axes=lora_axes(cfg),
                                     trainable=["lm_head"], init=init)  # fmt: skip
            residual, lora = lora_jax.init_lora_and_base(key, params_sh, spec)
            what = f"scan={scan} init={init}"
            S.assert_shardings(residual, jax.tree.map(lambda x: x.sharding, params_sh), f"{what} residual")
            S.assert_shardings(lora, lora_jax.adapter_shardings(params_sh, lora), f"{what} lora")
            sharded = [x for x in jax.tree.leaves(lora) if not x.sharding.is_fully_replicated]
            assert sharded, f"{what}: no adapter array is sharded"
            ref_residual, ref_lora = lora_jax.init_lora_and_base(key, params, spec)  # one device, host params
            S.assert_trees_close(residual, ref_residual, f"{what} residual vs one device", rtol=1e-5, atol=1e-5)
            got, want = _deltas(lora), _deltas(ref_lora)
            assert got.keys() == want.keys()
            for p in want:
                np.testing.assert_allclose(got[p], want[p], rtol=1e-5, atol=1e-5, err_msg=f"{what} {p}")
            back = lora_jax.apply_lora(residual, lora)
            S.assert_trees_close(back, params, f"{what} apply_lora(residual, lora) vs params", rtol=1e-5, atol=1e-5)
            print(f"OK {what}: {len(want)} kernels", flush=True)


def _quantized(params):
    return {p: x for p, x in flatten_with_paths(params).items() if isinstance(x, lora_jax.QuantizedKernel)}


def check_loftq() -> None:
    """LoftQ: the residual is quantized in the shardings derived from the kernel's, the values equal one device's."""
    mesh = S.auto_mesh((2, 4), ("data", "model"))
    cfg = S.config(False)
    params = S.init_params(cfg)
    params_sh = S.shard(params, mesh, S.base_specs(params))
    spec = lora_jax.LoraSpec(rank=4, alpha=8.0, targets=list(ATTENTION + MLP), axes=lora_axes(cfg), init="loftq")
    residual, lora = lora_jax.init_lora_and_base(jax.random.key(3), params_sh, spec, block_size=4)
    ref_residual, ref_lora = lora_jax.init_lora_and_base(jax.random.key(3), params, spec, block_size=4)
    want = lora_jax.quantized_shardings(ref_residual, jax.tree.map(lambda x: x.sharding, params_sh))
    S.assert_shardings(residual, want, "loftq residual")
    S.assert_shardings(lora, lora_jax.adapter_shardings(params_sh, lora), "loftq lora")
    quantized = [p for p, x in lora_jax.adapter_items(lora).items() if hasattr(x, "delta")]
    assert quantized, "loftq: no kernel adapted"
    assert _quantized(ref_residual)
    for p, q in _quantized(ref_residual).items():
        got_q = _quantized(residual)[p]
        for name in ("codes", "absmax"):  # bit-identical; the double-quant mean may differ in its last bit
            np.testing.assert_array_equal(np.asarray(getattr(got_q, name)), np.asarray(getattr(q, name)), err_msg=p)
        np.testing.assert_allclose(np.asarray(got_q.offset), np.asarray(q.offset), rtol=1e-6, err_msg=p)
    got, want_d = _deltas(lora), _deltas(ref_lora)
    for p in want_d:
        np.testing.assert_allclose(got[p], want_d[p], rtol=1e-5, atol=1e-5, err_msg=f"loftq {p}")
    print(f"OK loftq: {len(want_d)} kernels", flush=True)


def main() -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); found {jax.devices()}")
    check_svd_init()
    check_loftq()
    print("PASSED svd_init", flush=True)


if __name__ == "__main__":
    main()
