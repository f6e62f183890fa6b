"""One of two processes of the multi-process check (see ``tests/test_multiprocess.py``).

    XLA_FLAGS=--xla_force_host_platform_device_count=4 \\
        python tests/sharded/multiprocess_worker.py <process_id> <port> <shared_dir>

Both processes join one 8-device global mesh (2 x 4 CPU devices) through
``jax.distributed.initialize`` with CPU (gloo) collectives, then:

1. create sharded adapters for a megatron-sharded GPT (``init_lora_sharded``);
2. run data-parallel steps, each process feeding its own part of the batch
   (``jax.make_array_from_process_local_data``), and check losses and gathered
   adapters against a single-device run of the whole batch on a local device;
3. save with ``save_adapter`` (orbax, each process writes its shards) and
   restore onto a differently shaped global mesh;
4. ``export_peft`` the trained sharded adapters (gathered; process 0 writes)
   and, for comparison, the single-device reference.

Prints ``OK <check>`` lines; any failure raises (non-zero exit).
"""

from __future__ import annotations

import os
import pathlib
import sys
import traceback

import jax
import numpy as np
import sharded_checks as sc
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax


def log(msg: str) -> None:
    print(f"[process {jax.process_index()}] {msg}", flush=True)


def global_array(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a value every process holds in full."""
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def process_rows(x: np.ndarray, sharding: NamedSharding) -> np.ndarray:
    """The rows of the global batch ``x`` that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map(x.shape).values()
    start = min(i[0].start or 0 for i in idx)
    stop = max(x.shape[0] if i[0].stop is None else i[0].stop for i in idx)
    return x[start:stop]


def main(process_id: int, port: int, shared: pathlib.Path) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=90,
    )
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4, jax.devices()
    cfg = sc.config(scan=False)
    spec = sc.lora_spec(cfg, trainable=False)
    params = sc.init_params(cfg)  # host numpy, identical in both processes
    mesh = sc.auto_mesh((2, 4), ("data", "model"))
    specs = sc.base_specs(params)
    params_sh = jax.tree_util.tree_map(lambda x, s: global_array(np.asarray(x), NamedSharding(mesh, s)), params, specs)

    lora = lora_jax.init_lora_sharded(jax.random.key(2), params_sh, spec)
    derived = lora_jax.adapter_shardings(params_sh, lora)
    sc.assert_shardings(lora, derived, "init")
    assert not lora_jax.adapter_items(lora)["layers_0/mlp_in/kernel"].b.is_fully_addressable
    log("OK init sharded across processes")

    x, y = sc.batch(cfg)
    data = NamedSharding(mesh, P("data", None))
    xs, ys = (jax.make_array_from_process_local_data(data, process_rows(a, data), a.shape) for a in (x, y))
    lora0 = multihost_utils.process_allgather(lora, tiled=True)
    ref_lora, ref_losses = sc.reference_run(cfg, lora0, params, x, y)  # one local device, whole batch

    tx = sc.optimizer()
    opt_state = jax.jit(tx.init, out_shardings=lora_jax.optimizer_shardings(tx, lora))(lora)
    step = jax.jit(sc.make_step(sc.make_loss(cfg), tx))
    losses = []
    for _ in range(sc.STEPS):
        lora, opt_state, loss = step(lora, opt_state, params_sh, xs, ys)
        losses.append(float(loss))
    sc.assert_shardings(lora, derived, "after steps")
    sc.assert_shardings(opt_state[0].mu, derived, "adam mu")
    np.testing.assert_allclose(losses, ref_losses, rtol=sc.RTOL)
    trained = multihost_utils.process_allgather(lora, tiled=True)
    sc.assert_trees_close(trained, ref_lora, "data-parallel adapters")
    log(f"OK data-parallel step losses={[round(v, 5) for v in losses]}")

    ckpt = lora_jax.save_adapter(shared / "adapter", lora, spec)
    mesh2 = sc.auto_mesh((4, 2), ("data", "model"))
    params2 = jax.tree_util.tree_map(lambda x, s: global_array(np.asarray(x), NamedSharding(mesh2, s)), params, specs)
    target, shardings = sc.sharded_target(lora, params2)
    restored, _ = lora_jax.load_adapter(ckpt, target, spec=spec)
    sc.assert_shardings(restored, shardings, "restored onto 4x2")
    sc.assert_trees_close(multihost_utils.process_allgather(restored, tiled=True), trained, "restored", 0, 0)
    log("OK orbax save on 2x4, restore on 4x2")

    # Gathers non-addressable arrays; process 0 writes. No overwrite=True: every process checks that
    # the fresh path is free before process 0 writes it.
    lora_jax.export_peft(shared / "peft_sharded", lora, spec)
    lora_jax.export_peft(shared / "peft_reference", ref_lora, spec)
    log("OK export_peft")
    jax.distributed.shutdown()


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]))
    except BaseException:
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # skip jax.distributed's exit barrier, which would wait for the other process
