"""Sharded-training checks, run in a subprocess with 8 simulated CPU devices.

``tests/test_sharding.py`` runs every check once, in one process, as

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded/sharded_checks.py [check ...]

with a timeout (name checks, e.g. ``init train``, to run only those). Each check prints ``OK ...`` lines
as it goes and ends with ``PASSED <check>`` or, after its traceback,
``FAIL <check>``; the others still run. Importing this module has no side effects
(pytest's doctest collection imports it), and ``multiprocess_worker.py`` reuses
its model, shardings and reference loop.
"""

from __future__ import annotations

import functools
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_jax
from lora_jax.models.gpt import ATTENTION, GPT, MLP, GPTConfig, cross_entropy, lora_axes

RTOL, ATOL = 2e-5, 2e-6  # float32; sharded matmuls only reorder sums
STEPS = 3
LR = 1e-2


def optimizer() -> optax.GradientTransformation:
    """Adam with ``eps`` large enough to keep the comparison well conditioned.

    With the default ``eps=1e-8`` a first Adam step is ``lr * sign(g)``: for a
    gradient entry that is zero up to rounding, a reordered float sum (what
    sharding does) flips the sign and moves the weight by ``2 * lr``.
    """
    return optax.adam(LR, eps=1e-3)


def config(scan: bool = False) -> GPTConfig:
    return GPTConfig(vocab=32, d_model=16, heads=4, layers=2, d_ff=32, max_len=8, scan=scan)


def lora_spec(cfg: GPTConfig, *, trainable: bool = True) -> lora_jax.LoraSpec:
    return lora_jax.LoraSpec(
        rank=4,
        alpha=8.0,
        targets=list(ATTENTION + MLP),
        axes=lora_axes(cfg),
        trainable=["lm_head"] if trainable else None,
        init="random",  # A and B both nonzero, so every gradient is nonzero from step 1
    )


@functools.cache
def init_params(cfg: GPTConfig) -> Any:
    init = jax.jit(GPT(cfg).init)
    return jax.device_get(init(jax.random.key(0), jnp.zeros((1, cfg.max_len), jnp.int32))["params"])


def megatron_spec(path: str, leaf: Any) -> P:
    """Megatron-style partition of a GPT param over the ``"model"`` mesh axis.

    query/key/value and mlp_in are column-parallel (heads / d_ff axis sharded),
    out and mlp_out row-parallel (their input axis sharded), the LM head is
    vocab-parallel; norms, embeddings and the other biases are replicated. A
    scanned layer axis stays unpartitioned.
    """
    keys = path.split("/")
    stacked = (None,) if keys[0] == "layers" else ()
    module, kind = keys[-2], keys[-1]
    table = {
        ("query", "kernel"): (None, "model", None),
        ("query", "bias"): ("model", None),
        ("out", "kernel"): ("model", None, None),
        ("mlp_in", "kernel"): (None, "model"),
        ("mlp_in", "bias"): ("model",),
        ("mlp_out", "kernel"): ("model", None),
        ("lm_head", "kernel"): (None, "model"),
        ("lm_head", "bias"): ("model",),
    }
    name = "query" if module in ("key", "value") else module
    entries = table.get((name, kind))
    if entries is None:
        return P()
    return P(*stacked, *entries)


def base_specs(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: megatron_spec("/".join(str(getattr(k, "key", k)) for k in kp), x), params
    )


def auto_mesh(shape: tuple[int, ...], names: tuple[str, ...], devices: Any = None) -> jax.sharding.Mesh:
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape), devices=devices)


def shard(tree: Any, mesh: jax.sharding.Mesh, specs: Any) -> Any:
    return jax.device_put(tree, jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs))


def batch(cfg: GPTConfig, n: int = 16, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.asarray(jax.random.randint(jax.random.key(seed), (n, cfg.max_len + 1), 0, cfg.vocab))
    return tokens[:, :-1], tokens[:, 1:]


def make_loss(cfg: GPTConfig, mode: str = "apply_lora") -> Callable[..., jax.Array]:
    """The LM loss with the adapters applied as ``W + BA`` (``"apply_lora"``) or factored."""
    model = GPT(cfg)
    forward = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
    if mode == "factored":
        fwd = lora_jax.factored(forward)
    else:
        fwd = lambda params, lora, x: forward(lora_jax.apply_lora(params, lora), x)  # noqa: E731

    def loss_fn(lora: Any, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return cross_entropy(fwd(params, lora, x), y)

    return loss_fn


def make_step(loss_fn: Callable[..., jax.Array], tx: optax.GradientTransformation) -> Callable[..., Any]:
    def step(lora, opt_state, params, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, x, y)
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


def reference_run(
    cfg: GPTConfig, lora: Any, params: Any, x: np.ndarray, y: np.ndarray, steps: int = STEPS, mode: str = "apply_lora"
) -> tuple:
    """The single-device run everything is compared with: ``steps`` adam steps on one device."""
    dev = jax.local_devices()[0]
    lora, params = jax.device_put((lora, params), dev)
    tx = optimizer()
    step = jax.jit(make_step(make_loss(cfg, mode), tx))
    opt_state = jax.jit(tx.init)(lora)
    losses = []
    for _ in range(steps):
        lora, opt_state, loss = step(lora, opt_state, params, x, y)
        losses.append(float(loss))
    return jax.device_get(lora), losses


def assert_trees_close(got: Any, want: Any, what: str, rtol: float = RTOL, atol: float = ATOL) -> None:
    pg = jax.tree_util.tree_flatten_with_path(got)[0]
    pw = jax.tree_util.tree_leaves(want)
    assert len(pg) == len(pw), f"{what}: {len(pg)} leaves vs {len(pw)}"
    for (kp, g), w in zip(pg, pw, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=f"{what}: {jax.tree_util.keystr(kp)}")


def assert_shardings(tree: Any, expected: Any, what: str) -> None:
    """Every array in ``tree`` is laid out as ``expected`` says (and no leaf is silently replicated)."""
    got = jax.tree_util.tree_flatten_with_path(tree)[0]
    want = jax.tree_util.tree_leaves(expected, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
    assert len(got) == len(want), f"{what}: {len(got)} arrays vs {len(want)} shardings"
    for (kp, arr), s in zip(got, want, strict=True):
        assert arr.sharding.is_equivalent_to(s, arr.ndim), (
            f"{what}{jax.tree_util.keystr(kp)}: sharding {arr.sharding} is not the derived {s}"
        )


def sharded_setup(mesh: jax.sharding.Mesh, params: Any, spec: lora_jax.LoraSpec) -> tuple:
    params_sh = shard(params, mesh, base_specs(params))
    lora = lora_jax.init_lora(jax.random.key(2), params_sh, spec)  # sharded params: adapters born sharded
    return params_sh, lora, lora_jax.adapter_shardings(params_sh, lora)


# --------------------------------------------------------------------------- checks


def assert_no_full_copy(params_sh: Any, spec: lora_jax.LoraSpec) -> None:
    """The compiled per-device init program never forms a sharded adapter at its full shape, and moves no data."""
    from lora_jax.parallel import _init as _sharding

    fn, values = _sharding._sharded_init(params_sh, spec, shardings=None, mesh=None)
    key = jax.random.key(2)
    hlo = fn.lower(key, values).compile().as_text()
    collectives = [op for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute") if op in hlo]
    assert not collectives, f"the sharded init communicates: {collectives}"
    shown = lambda shape: "[" + ",".join(map(str, shape)) + "]"  # noqa: E731  (as HLO writes shapes)
    for path, node in lora_jax.adapter_items(fn(key, values)).items():
        for name in ("a", "b"):
            x = getattr(node, name, None)
            if x is None or x.sharding.is_fully_replicated:
                continue
            assert shown(x.shape) not in hlo, f"{path}.{name}: the init program forms its full shape {x.shape}"
            assert shown(x.addressable_shards[0].data.shape) in hlo


def check_init() -> None:
    """Adapters are born sharded with the derived shardings and equal the unsharded init."""
    mesh = auto_mesh((2, 4), ("data", "model"))
    for scan in (False, True):
        cfg = config(scan)
        spec = lora_spec(cfg)
        params = init_params(cfg)
        params_sh, lora, derived = sharded_setup(mesh, params, spec)
        assert_shardings(lora, derived, f"init(scan={scan})")
        explicit = lora_jax.init_lora_sharded(jax.random.key(2), params_sh, spec)
        assert_shardings(explicit, derived, f"init_lora_sharded(scan={scan})")
        assert_trees_close(explicit, lora, "init_lora_sharded vs init_lora", 0, 0)
        single = jax.jit(lambda key, params=params, spec=spec: lora_jax.init_lora(key, params, spec))
        assert_trees_close(lora, single(jax.random.key(2)), "init values vs single-device jit", 0, 0)
        # the closed form of the derived specs for megatron-style sharding
        items = lora_jax.adapter_items(derived)
        b = (None,) if scan else ()
        layer = "layers" if scan else "layers_0"
        want = {  # trailing Nones are dropped, as jax.jit writes output shardings
            f"{layer}/query/kernel": (P(), P(*b, None, "model")),
            f"{layer}/out/kernel": (P(*b, "model"), P()),
            f"{layer}/mlp_in/kernel": (P(), P(*b, None, "model")),
            f"{layer}/mlp_out/kernel": (P(*b, "model"), P()),
        }
        for path, (pa, pb) in want.items():
            assert (items[path].a.spec, items[path].b.spec) == (pa, pb), (path, items[path])
        assert items["lm_head/kernel"].value.spec == P(None, "model")
        # every device holds only its part: the B of a column-parallel kernel is split 4 ways
        node = lora_jax.adapter_items(lora)[f"{layer}/mlp_in/kernel"]
        assert {s.data.shape for s in node.b.addressable_shards} == {
            ((cfg.layers,) if scan else ()) + (4, cfg.d_ff // 4)
        }
        assert_no_full_copy(params_sh, spec)
        print(f"OK init scan={scan}")

    # from abstract params: ShapeDtypeStructs carrying shardings (no base weights materialized)
    cfg = config()
    params = init_params(cfg)
    abstract = jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, s)), params, base_specs(params)
    )
    spec = lora_spec(cfg, trainable=False)
    lora = lora_jax.init_lora(jax.random.key(2), abstract, spec)
    assert_shardings(lora, lora_jax.adapter_shardings(abstract, lora), "init from ShapeDtypeStructs")
    assert_trees_close(lora, lora_jax.init_lora(jax.random.key(2), params, spec), "abstract init values", 3e-7, 0)
    print("OK init abstract")


def _train_sharded(cfg, mesh, params, spec, mode: str, reference: tuple) -> None:
    x, y = batch(cfg)
    params_sh, lora, derived = sharded_setup(mesh, params, spec)
    ref_lora, ref_losses = reference
    tx = optimizer()
    opt_state = jax.jit(tx.init, out_shardings=lora_jax.optimizer_shardings(tx, lora))(lora)
    step = jax.jit(make_step(make_loss(cfg, mode), tx))
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x, y))
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss = step(lora, opt_state, params_sh, xs, ys)
        losses.append(float(loss))
        assert_shardings(lora, derived, f"{mode}: adapters after a step")
        adam = opt_state[0]
        assert_shardings(adam.mu, derived, f"{mode}: adam mu")
        assert_shardings(adam.nu, derived, f"{mode}: adam nu")
        assert adam.count.sharding.is_fully_replicated
    assert step._cache_size() == 1, "the step recompiled: an output sharding differs from its input's"
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg=f"{mode}: losses")
    assert losses[-1] < losses[0], losses
    assert_trees_close(lora, ref_lora, f"{mode}: adapters after {STEPS} steps")
    print(f"OK train {mode} losses={[round(v, 5) for v in losses]}")


def check_train() -> None:
    """2-D (data x model) mesh, megatron-style base, scanned layers: equal to the single-device run."""
    mesh = auto_mesh((2, 4), ("data", "model"))
    cfg = config(scan=True)
    params = init_params(cfg)
    spec = lora_spec(cfg)
    reference = single_device_reference(cfg)[3]  # one device, apply_lora
    for mode in ("apply_lora", "factored"):
        _train_sharded(cfg, mesh, params, spec, mode, reference)


@functools.cache
def single_device_reference(cfg: GPTConfig) -> tuple:
    """``(x, y, lora0, (lora, losses))``: the batch, initial adapters and the single-device run (cached)."""
    params, spec = init_params(cfg), lora_spec(cfg)
    x, y = batch(cfg)
    lora0 = jax.device_get(jax.jit(lambda key: lora_jax.init_lora(key, params, spec))(jax.random.key(2)))
    return x, y, lora0, reference_run(cfg, lora0, params, x, y)


def _local_step(cfg, tx, axis: str, *, shard_map: bool = False):
    """One data-parallel step on a device's part of the batch.

    Under ``pmap`` each device's gradient is local: average it with ``pmean``.
    Under ``shard_map`` (which tracks replicated vs varying values) the
    gradient of a replicated input is already summed over devices by the
    transpose, so a ``pmean`` after ``grad`` would give ``n`` times the mean
    gradient; differentiate the global loss ``pmean(local loss)`` instead.
    """
    loss_fn = make_loss(cfg)

    def step(lora, opt_state, params, x, y):
        if shard_map:
            global_loss = lambda lo: jax.lax.pmean(loss_fn(lo, params, x, y), axis)  # noqa: E731
            loss, grads = jax.value_and_grad(global_loss)(lora)
        else:
            loss, grads = jax.value_and_grad(loss_fn)(lora, params, x, y)
            grads, loss = jax.lax.pmean((grads, loss), axis)  # equal shards: the mean of means is the mean
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss

    return step


def check_pmap() -> None:
    """A pmap data-parallel loop over 8 devices equals the single-device run."""
    cfg = config(scan=True)
    params = init_params(cfg)
    x, y, lora0, (ref_lora, ref_losses) = single_device_reference(cfg)
    n = jax.device_count()
    tx = optimizer()
    replicate = lambda t: jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), t)  # noqa: E731
    lora, opt_state, rparams = replicate(lora0), replicate(jax.jit(tx.init)(lora0)), replicate(params)
    xs, ys = x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1])
    step = jax.pmap(_local_step(cfg, tx, "batch"), axis_name="batch")
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss = step(lora, opt_state, rparams, xs, ys)
        losses.append(float(loss[0]))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    lora = jax.device_get(lora)
    for k in range(n):  # every replica holds the same adapters, equal to the reference
        assert_trees_close(jax.tree_util.tree_map(lambda a, k=k: a[k], lora), ref_lora, f"pmap replica {k}")
    print(f"OK pmap losses={[round(v, 5) for v in losses]}")


def check_shard_map() -> None:
    """A shard_map data-parallel loop over an 8-device mesh equals the single-device run."""
    cfg = config(scan=True)
    params = init_params(cfg)
    x, y, lora0, (ref_lora, ref_losses) = single_device_reference(cfg)
    mesh = auto_mesh((8,), ("data",))
    tx = optimizer()
    step = jax.jit(
        jax.shard_map(
            _local_step(cfg, tx, "data", shard_map=True),
            mesh=mesh,
            in_specs=(P(), P(), P(), P("data"), P("data")),
            out_specs=(P(), P(), P()),
        )
    )
    rep = NamedSharding(mesh, P())
    lora, opt_state, rparams = jax.device_put((lora0, jax.jit(tx.init)(lora0), params), rep)
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data"))) for a in (x, y))
    losses = []
    for _ in range(STEPS):
        lora, opt_state, loss = step(lora, opt_state, rparams, xs, ys)
        losses.append(float(loss))
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
    assert_trees_close(lora, ref_lora, "shard_map adapters")
    print(f"OK shard_map losses={[round(v, 5) for v in losses]}")


def sharded_target(lora: Any, params_sh: Any) -> tuple[Any, Any]:
    """``(abstract, shardings)``: ``lora``'s shapes laid out like adapters of ``params_sh`` (for restoring)."""
    shardings = lora_jax.adapter_shardings(params_sh, jax.eval_shape(lambda: lora))
    abstract = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), jax.eval_shape(lambda: lora), shardings
    )
    return abstract, shardings


def check_orbax() -> None:
    """Sharded adapters saved on a 2x4 mesh restore onto 4x2 and 8x1 meshes with the derived shardings."""
    cfg = config(scan=True)
    params = init_params(cfg)
    spec = lora_spec(cfg)
    _, lora, _ = sharded_setup(auto_mesh((2, 4), ("data", "model")), params, spec)
    want = jax.device_get(lora)
    with tempfile.TemporaryDirectory() as tmp:
        path = lora_jax.save_adapter(f"{tmp}/adapter", lora, spec)
        for shape in ((4, 2), (8, 1)):
            params_sh = shard(params, auto_mesh(shape, ("data", "model")), base_specs(params))
            target, shardings = sharded_target(lora, params_sh)
            restored, saved_spec = lora_jax.load_adapter(path, target, params=params_sh, spec=spec)
            assert saved_spec == spec
            assert_shardings(restored, shardings, f"restored onto {shape}")
            assert_trees_close(restored, want, f"restored onto {shape}", 0, 0)
            node = lora_jax.adapter_items(restored)["layers/mlp_in/kernel"]
            assert {s.data.shape for s in node.b.addressable_shards} == {(cfg.layers, 4, cfg.d_ff // shape[1])}
            print(f"OK orbax restore 2x4 -> {shape[0]}x{shape[1]}")


def check_frozen_train() -> None:
    """LoRA-FA on the 2x4 mesh: the split trainable part trains with ``optimizer_shardings(tx, trainable)``.

    A stays exactly as initialized, the trainable part and Adam's state keep the
    derived shardings after every step (no recompilation), and the losses equal
    the same loop on one device.
    """
    mesh = auto_mesh((2, 4), ("data", "model"))
    cfg = config(scan=True)
    params = init_params(cfg)
    spec = lora_spec(cfg).replace(freeze_a=True)
    params_sh, lora, derived = sharded_setup(mesh, params, spec)
    trainable, frozen = lora_jax.split(lora)
    want = lora_jax.adapter_shardings(params_sh, trainable)  # of the trainable part: A's holes stay None
    assert want == lora_jax.split(derived)[0], "the trainable part's shardings differ from the whole tree's"
    tx = optimizer()
    opt_state = jax.jit(tx.init, out_shardings=lora_jax.optimizer_shardings(tx, trainable))(trainable)
    loss_fn = make_loss(cfg)

    def step(trainable, opt_state, frozen, params, x, y):
        loss, grads = jax.value_and_grad(lambda t: loss_fn(lora_jax.combine(t, frozen), params, x, y))(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, loss

    x, y = batch(cfg)
    a_before = {
        p: np.asarray(n.a)
        for p, n in lora_jax.adapter_items(jax.device_get(frozen)).items()
        if getattr(n, "a", None) is not None
    }
    assert a_before, "LoRA-FA has frozen A arrays"
    ref_t, ref_state = jax.device_put((jax.device_get(trainable), jax.device_get(opt_state)), jax.local_devices()[0])
    ref_args = jax.device_put((jax.device_get(frozen), params), jax.local_devices()[0])
    sharded_step = jax.jit(step)
    single_step = jax.jit(lambda *args: step(*args))  # a cache of its own: _cache_size counts sharded_step only
    xs, ys = (jax.device_put(a, NamedSharding(mesh, P("data", None))) for a in (x, y))
    losses, ref_losses = [], []
    for _ in range(STEPS):
        trainable, opt_state, loss = sharded_step(trainable, opt_state, frozen, params_sh, xs, ys)
        ref_t, ref_state, ref_loss = single_step(ref_t, ref_state, *ref_args, x, y)
        losses.append(float(loss))
        ref_losses.append(float(ref_loss))
        assert_shardings(trainable, want, "frozen_train: the trainable part after a step")
        assert_shardings(opt_state[0].mu, want, "frozen_train: adam mu")
        assert_shardings(opt_state[0].nu, want, "frozen_train: adam nu")
        assert opt_state[0].count.sharding.is_fully_replicated
    assert sharded_step._cache_size() == 1, "the step recompiled: an output sharding differs from its input's"
    np.testing.assert_allclose(losses, ref_losses, rtol=RTOL, err_msg="frozen_train: losses")
    assert losses[-1] < losses[0], losses
    assert_trees_close(trainable, ref_t, f"frozen_train: the trainable part after {STEPS} steps")
    joined = lora_jax.adapter_items(jax.device_get(lora_jax.combine(trainable, frozen)))
    for path, a in a_before.items():
        np.testing.assert_array_equal(np.asarray(joined[path].a), a, err_msg=f"{path}: the frozen A moved")
    print(f"OK frozen_train losses={[round(v, 5) for v in losses]} ({len(a_before)} frozen A arrays unchanged)")


CHECKS = {
    "init": check_init,
    "train": check_train,
    "frozen_train": check_frozen_train,
    "pmap": check_pmap,
    "shard_map": check_shard_map,
    "orbax": check_orbax,
}


def main(argv: list[str]) -> None:
    """Run the named checks (all by default), each to the end; exit 1 if any failed."""
    if jax.device_count() != 8:
        raise SystemExit(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8); found {jax.devices()}")
    failed = []
    for name in argv or list(CHECKS):
        try:
            CHECKS[name]()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            print(f"FAIL {name}", flush=True)
        else:
            print(f"PASSED {name}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
