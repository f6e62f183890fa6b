"""VeRA on sharded params, run in a subprocess with 8 simulated CPU devices.

``tests/test_vera_sharded.py`` runs

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded/vera_checks.py

and asserts it ends with ``PASSED vera``. On the GPT decoder with Megatron
shardings over a 2x4 (data x model) mesh, plain and ``nn.scan``-stacked:
``init_lora`` and ``init_lora_sharded`` give every ``d``/``b`` its derived
sharding (``d`` replicated over its rank axis, ``b`` the kernel's output
partition), the shared ``vera_a``/``vera_b`` replicated on the mesh, values
equal to the single-device init; a jitted factored training step keeps those
shardings (no recompilation), leaves the projections unchanged and gives the
single-device losses. Importing this module has no side effects.
"""

from __future__ import annotations

import jax
import numpy as np
import sharded_checks as S
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.models.gpt import ATTENTION, MLP, lora_axes

SHARED = "__shared__"


def vera_spec(cfg) -> lora_jax.LoraSpec:
    return lora_jax.LoraSpec(rank=4, targets=list(ATTENTION + MLP), axes=lora_axes(cfg), vera=True)


def check_init(mesh) -> None:
    key = jax.random.key(2)
    for scan in (False, True):
        cfg = S.config(scan)
        params, spec = S.init_params(cfg), vera_spec(cfg)
        params_sh = S.shard(params, mesh, S.base_specs(params))
        lora = lora_jax.init_lora(key, params_sh, spec)
        derived = lora_jax.adapter_shardings(params_sh, lora)
        S.assert_shardings(lora, derived, f"vera init(scan={scan})")
        explicit = lora_jax.init_lora_sharded(key, params_sh, spec)
        S.assert_shardings(explicit, derived, f"vera init_lora_sharded(scan={scan})")
        S.assert_trees_close(explicit, lora, "vera init_lora_sharded vs init_lora", 0, 0)
        single = jax.jit(lambda k, params=params, spec=spec: lora_jax.init_lora(k, params, spec))(key)
        S.assert_trees_close(lora, single, f"vera init(scan={scan}) vs single-device jit", 0, 0)
        eager = lora_jax.init_lora(key, params, spec)  # unsharded, eager
        S.assert_trees_close(lora, eager, f"vera init(scan={scan}) vs eager single-device", 1e-6, 1e-7)
        # the shared projections: one copy, replicated on the kernels' mesh
        for name in ("vera_a", "vera_b"):
            x = lora[SHARED][name]
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, P()), x.ndim), (name, x.sharding)
            assert x.sharding.device_set == set(mesh.devices.flat), name
        # the closed form: d (*batch, r) replicated, b (*batch, *out) the kernel's output partition
        items = lora_jax.adapter_items(derived)
        b = (None,) if scan else ()
        layer = "layers" if scan else "layers_0"
        want = {
            f"{layer}/query/kernel": P(*b, "model"),  # (d, heads, head_dim), heads column-parallel
            f"{layer}/out/kernel": P(),  # row-parallel: b is over d_model, replicated
            f"{layer}/mlp_in/kernel": P(*b, "model"),
            f"{layer}/mlp_out/kernel": P(),
        }
        for path, pb in want.items():
            assert (items[path].d.spec, items[path].b.spec) == (P(), pb), (path, items[path])
        node = lora_jax.adapter_items(lora)[f"{layer}/mlp_in/kernel"]
        assert {s.data.shape for s in node.b.addressable_shards} == {((cfg.layers,) if scan else ()) + (cfg.d_ff // 4,)}
        print(f"OK vera init scan={scan}", flush=True)


def check_train(mesh) -> None:
    cfg = S.config(scan=True)
    params, spec = S.init_params(cfg), vera_spec(cfg)
    params_sh = S.shard(params, mesh, S.base_specs(params))
    lora = lora_jax.init_lora(jax.random.key(2), params_sh, spec)
    derived = lora_jax.adapter_shardings(params_sh, lora)
    shared0 = jax.device_get(lora[SHARED])
    ref_lora, ref_losses = S.reference_run(cfg, jax.device_get(lora), params, *S.batch(cfg), mode="factored")
    tx = S.optimizer()
    opt_state = jax.jit(tx.init, out_shardings=lora_jax.optimizer_shardings(tx, lora))(lora)
    step = jax.jit(S.make_step(S.make_loss(cfg, "factored"), tx))
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in S.batch(cfg))
    losses = []
    for _ in range(S.STEPS):
        lora, opt_state, loss = step(lora, opt_state, params_sh, xs, ys)
        losses.append(float(loss))
        S.assert_shardings(lora, derived, "vera train: adapters after a step")
        S.assert_shardings(opt_state[0].mu, derived, "vera train: adam mu")
    assert step._cache_size() == 1, "the step recompiled: an output sharding differs from its input's"
    np.testing.assert_allclose(losses, ref_losses, rtol=S.RTOL, err_msg="vera train: losses")
    assert losses[-1] < losses[0], losses
    S.assert_trees_close(lora, ref_lora, f"vera train: adapters after {S.STEPS} steps")
    moved = [float(np.abs(np.asarray(n.b)).max()) for n in lora_jax.adapter_items(jax.device_get(lora)).values()]
    assert min(moved) > 0, "some b did not train"
    for name, x in shared0.items():
        np.testing.assert_array_equal(np.asarray(lora[SHARED][name]), x, err_msg=f"the frozen {name} moved")
    print(f"OK vera train factored losses={[round(v, 5) for v in losses]}", flush=True)


def main() -> None:
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); found {jax.devices()}")
    mesh = S.auto_mesh((2, 4), ("data", "model"))
    check_init(mesh)
    check_train(mesh)
    print("PASSED vera", flush=True)


if __name__ == "__main__":
    main()
