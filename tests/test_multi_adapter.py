"""A bank of adapters (stack / select / replace), mixed batches and hot-swap serving (issue #15).

References: ``fn(apply_lora(params, adapter_i), x_i)`` per example, with each adapter as it was made (its own
rank, scale, targets, node type); float64 for the small MLP (tolerance 1e-12), float32 for the demo's GPT.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import LoraSpec, apply_lora, init_lora, mixed_batch, select, stack
from lora_jax.models.gpt import ATTENTION, MLP
from tests._jaxpr_shapes import eqn_shapes
from tests._small_models import GPT, gpt_config, gpt_params, lora_axes, random_like, tokens_for
from tests._xla_env import xla_env

F64 = 1e-12


@pytest.fixture
def x64():
    """float64 closed forms need x64, for the tests that ask for it (a global switch would leak)."""
    with jax.enable_x64(True):
        yield


# ------------------------------------------------------------------ a small MLP, float64


def mlp_params(dtype="float64"):
    rng = np.random.default_rng(0)
    return {
        "up": {
            "kernel": jnp.asarray(rng.normal(0, 0.5, (6, 10)), dtype),
            "bias": jnp.asarray(rng.normal(0, 0.1, 10), dtype),
        },
        "down": {"kernel": jnp.asarray(rng.normal(0, 0.5, (10, 5)), dtype)},
    }


def mlp(p, x):
    return jnp.tanh(x @ p["up"]["kernel"] + p["up"]["bias"]) @ p["down"]["kernel"]


def mlp_adapters(params, *, dora=True):
    """Different ranks, alphas, rslora, target sets and node types (LoRA, DoRA, VeRA)."""
    f = "float64"
    out = [
        init(0, params, LoraSpec(rank=2, alpha=4.0, dtype=f)),
        init(1, params, LoraSpec(rank=4, alpha=2.0, rslora=True, targets=["down"], dtype=f)),
        init(3, params, LoraSpec(rank=1, alpha=8.0, targets=["up"], dtype=f)),
    ]
    if dora:
        spec = LoraSpec(rank=3, alpha=3.0, dora=True, targets=["up"], dtype=f)
        out.insert(2, init(2, params, spec))
    else:
        out.append(init(4, params, LoraSpec(rank=3, vera=True, targets=["up", "down"], dtype=f)))
        out.append(init(5, params, LoraSpec(rank=2, alpha=3.0, adalora=True, targets=["down"], dtype=f)))
    return out


def assert_trees_close(got, want, atol):
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=0)


@functools.cache
def jitted(fn):
    return jax.jit(fn)


def init(seed, params, spec):
    """``init_lora``'s tree for ``spec`` with every array random N(0, 0.2) (DoRA's m too, so m != ‖W + s·A·B‖).

    Filled with NumPy (``random_like``): an XLA compile of init_lora's random init costs seconds on 2 cores.
    """
    return random_like(jax.eval_shape(lambda p: init_lora(jax.random.key(0), p, spec), params), seed)


@pytest.fixture(scope="module")
def dora_case():
    """(params, adapters, bank) of the MLP in float64: LoRA, LoRA (rslora, down only), DoRA (up only), LoRA (up)."""
    with jax.enable_x64(True):  # made in float64; each test that uses them enables x64 itself (fixture x64)
        params = mlp_params()
        adapters = mlp_adapters(params, dora=True)
        return params, adapters, stack(adapters, params=params)


@pytest.fixture(scope="module")
def lora_case():
    """As :func:`dora_case` with VeRA (up, down) in place of the DoRA adapter, and AdaLoRA (down); no params."""
    with jax.enable_x64(True):
        params = mlp_params()
        adapters = mlp_adapters(params, dora=False)
        return params, adapters, stack(adapters)


@pytest.fixture(params=["dora_case", "lora_case"], ids=["with_dora", "lora_vera"])
def mlp_case(request):
    return request.getfixturevalue(request.param)


def reference_rows(fn, params, adapters, ids, *args):
    """``fn(apply_lora(params, adapters[i]), x_j)`` per example (``params`` for -1), each adapter as it was made."""
    rows = []
    for j, i in enumerate(np.asarray(ids)):
        p = params if i == -1 else apply_lora(params, adapters[i])
        rows.append(jitted(fn)(p, *(x[j : j + 1] for x in args))[0])
    return jnp.stack(rows)


def test_select_applied_equals_each_adapter_applied(x64, mlp_case):
    params, adapters, bank = mlp_case
    assert len(bank) == len(adapters)
    for i, lora in enumerate(adapters):
        assert_trees_close(apply_lora(params, select(bank, i)), apply_lora(params, lora), F64)


def test_select_has_one_structure_and_jit_traces_once(x64, dora_case):
    params, adapters, bank = dora_case
    structures = {jax.tree_util.tree_structure(select(bank, i)) for i in range(len(bank))}
    assert len(structures) == 1
    node = select(bank, 1)["down"]["kernel"]
    assert isinstance(node, lora_jax.DoraWeights) is False and node.scale == 1.0 and node.rank == 4
    assert isinstance(select(bank, 0)["up"]["kernel"], lora_jax.DoraWeights)
    traces = []

    @jax.jit
    def f(p, lora, x):
        traces.append(1)
        return mlp(apply_lora(p, lora), x)

    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 6)))
    for i, lora in enumerate(adapters):
        np.testing.assert_allclose(f(params, select(bank, i), x), mlp(apply_lora(params, lora), x), atol=F64)
    assert len(traces) == 1
    by_index = jax.jit(lambda b, i, x: f(params, select(b, i), x))  # i traced
    np.testing.assert_allclose(by_index(bank, 2, x), mlp(apply_lora(params, adapters[2]), x), atol=F64)
    np.testing.assert_allclose(by_index(bank, 3, x), mlp(apply_lora(params, adapters[3]), x), atol=F64)


def test_stack_folds_scale_and_pads_rank(x64, lora_case):
    _, adapters, bank = lora_case  # no DoRA: stacked without params
    one = adapters[0]["down"]["kernel"]
    a, b = bank.a["down/kernel"], bank.b["down/kernel"]
    assert a.shape == (5, 10, 4) and b.shape == (5, 4, 5)
    np.testing.assert_array_equal(a[0, :, :2], one.a)
    np.testing.assert_array_equal(a[0, :, 2:], 0)
    np.testing.assert_allclose(b[0, :2], one.scale * one.b, atol=F64)
    np.testing.assert_array_equal(b[0, 2:], 0)
    np.testing.assert_array_equal(b[2], 0)  # adapter 2 does not target down: the identity


def test_bfloat16_adapters_keep_bfloat16_a_and_fold_the_scale_into_a_float32_b():
    params = mlp_params("float32")
    loras = [init(k, params, LoraSpec(rank=k + 1, alpha=3.0, dtype="bfloat16")) for k in range(2)]
    bank = stack(loras)
    assert bank.a["up/kernel"].dtype == jnp.bfloat16 and bank.b["up/kernel"].dtype == jnp.float32
    for i, lora in enumerate(loras):
        assert_trees_close(apply_lora(params, select(bank, i)), apply_lora(params, lora), 1e-6)


def test_mixed_batch_rows_equal_their_own_adapter_mlp(x64, mlp_case):
    params, adapters, bank = mlp_case
    x = jnp.asarray(np.random.default_rng(6).normal(size=(7, 6)))
    ids = jnp.array([3, -1, 0, 2, 1, 0, -1])
    want = reference_rows(mlp, params, adapters, ids, x)
    np.testing.assert_allclose(jax.jit(mixed_batch(mlp))(params, bank, ids, x), want, atol=F64)
    if not bank.m:  # eager too (op by op: slow on 2 cores, so once)
        np.testing.assert_allclose(mixed_batch(mlp)(params, bank, ids, x), want, atol=F64)


def test_mixed_batch_retraces_for_no_new_ids_or_bank_contents(x64, dora_case):
    params, adapters, bank = dora_case
    traces = []

    def fn(p, x):
        traces.append(1)
        return mlp(p, x)

    run = jax.jit(mixed_batch(fn))
    x = jnp.asarray(np.random.default_rng(7).normal(size=(5, 6)))
    ids_list = [jnp.array([0, 1, 2, 3, -1]), jnp.array([3, 3, -1, 0, 1])]
    for ids in ids_list:
        np.testing.assert_allclose(run(params, bank, ids, x), reference_rows(mlp, params, adapters, ids, x), atol=F64)
    new = init(9, params, LoraSpec(rank=2, alpha=5.0, targets=["down"], dtype="float64"))
    swapped = bank.replace(1, new, params=params)
    adapters2 = [*adapters[:1], new, *adapters[2:]]
    ids = ids_list[1]
    np.testing.assert_allclose(run(params, swapped, ids, x), reference_rows(mlp, params, adapters2, ids, x), atol=F64)
    assert len(traces) == 1


def per_adapter_kernels(jaxpr, kernels, sizes):
    """Values shaped like a kernel with one more axis of one of ``sizes`` (K or the batch), at any position."""
    found = []
    for prim, shape in eqn_shapes(jaxpr):
        for k in range(len(shape)):
            if shape[k] in sizes and shape[:k] + shape[k + 1 :] in kernels:
                found.append((prim, shape))
    return found


def test_mixed_batch_forms_no_kernel_per_adapter_or_example(x64, dora_case):
    params, _, bank = dora_case
    x = jnp.ones((7, 6))
    jaxpr = jax.make_jaxpr(mixed_batch(mlp))(params, bank, jnp.zeros(7, jnp.int32), x).jaxpr
    assert per_adapter_kernels(jaxpr, {(6, 10), (10, 5)}, {7}) == []
    assert len(bank) == 4 and per_adapter_kernels(jaxpr, {(6, 10), (10, 5)}, {4}) == []
    # the check sees a kernel formed per example: apply_lora under vmap forms (7, 6, 10)
    formed = jax.make_jaxpr(jax.vmap(lambda lo, x: mlp(apply_lora(params, lo), x[None])))(
        jax.vmap(lambda i: select(bank, i))(jnp.zeros(7, jnp.int32)), x
    ).jaxpr
    assert per_adapter_kernels(formed, {(6, 10)}, {7})


# ------------------------------------------------------------------ the demo's GPT, float32

CFG = gpt_config(vocab=16, max_len=8, layers=1)
GPT_ATOL = 2e-5


def gpt_forward(p, tokens):
    return GPT(CFG).apply({"params": p}, tokens)


def gpt_adapters(params):
    """LoRA on every block kernel, rsLoRA of rank 4 on query/value, DoRA on the MLP and query."""
    axes = lora_axes(CFG)
    return [
        init(10, params, LoraSpec(rank=2, alpha=4.0, targets=list(ATTENTION + MLP), axes=axes)),
        init(11, params, LoraSpec(rank=4, alpha=16.0, rslora=True, targets=["query", "value"], axes=axes)),
        init(12, params, LoraSpec(rank=2, dora=True, targets=["mlp_in", "mlp_out", "query"], axes=axes)),
    ]


@pytest.fixture(scope="module")
def gpt_bank():
    params = gpt_params(CFG)
    adapters = gpt_adapters(params)
    return params, adapters, stack(adapters, params=params)


def test_mixed_batch_gpt_forward_rows_equal_their_own_adapter(gpt_bank):
    params, adapters, bank = gpt_bank
    tokens = tokens_for(CFG, batch=5, seed=3)
    ids = jnp.array([2, 0, -1, 1, 2])
    got = jax.jit(mixed_batch(gpt_forward))(params, bank, ids, tokens)
    want = reference_rows(gpt_forward, params, adapters, ids, tokens)
    assert float(jnp.max(jnp.abs(want[0] - want[1]))) > 1e-2  # the adapters differ visibly
    np.testing.assert_allclose(got, want, atol=GPT_ATOL, rtol=0)
    jaxpr = jax.make_jaxpr(mixed_batch(gpt_forward))(params, bank, ids, tokens).jaxpr
    assert per_adapter_kernels(jaxpr, {f.kernel_shape for f in bank.forms}, {len(bank), 5}) == []


def greedy(p, prompt, steps=3):
    """Greedy decoding: ``steps`` argmax tokens written after ``prompt`` (batch, T0), fixed-length buffer."""
    t0 = prompt.shape[1]
    toks = jnp.zeros((prompt.shape[0], CFG.max_len), prompt.dtype).at[:, :t0].set(prompt)

    def write(k, toks):
        logits = gpt_forward(p, toks)
        nxt = jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t0 - 1 + k, axis=1, keepdims=False), axis=-1)
        return jax.lax.dynamic_update_slice_in_dim(toks, nxt.astype(toks.dtype)[:, None], t0 + k, axis=1)

    return jax.lax.fori_loop(0, steps, write, toks)[:, t0 : t0 + steps]


def test_hot_swap_serves_every_slot_and_loaded_adapters_with_one_trace(gpt_bank, tmp_path):
    params, adapters, bank = gpt_bank
    traces = {"forward": 0, "greedy": 0}

    @jax.jit
    def serve(p, lora, tokens):
        traces["forward"] += 1
        return lora_jax.factored(gpt_forward)(p, lora, tokens)

    @jax.jit
    def decode(p, lora, prompt):
        traces["greedy"] += 1
        return greedy(apply_lora(p, lora), prompt)

    tokens, prompt = tokens_for(CFG, batch=2, seed=4), tokens_for(CFG, batch=2, seed=5)[:, :5]
    ref_forward = jax.jit(gpt_forward)
    ref_greedy = jax.jit(greedy)

    def check(lora_in_bank, lora):
        applied = apply_lora(params, lora)
        np.testing.assert_allclose(serve(params, lora_in_bank, tokens), ref_forward(applied, tokens), atol=GPT_ATOL)
        np.testing.assert_array_equal(decode(params, lora_in_bank, prompt), ref_greedy(applied, prompt))

    for i, lora in enumerate(adapters):
        check(select(bank, i), lora)
    axes = lora_axes(CFG)
    spec = LoraSpec(rank=2, alpha=6.0, targets=["query", "mlp_in"], axes=axes)
    saved = init(20, params, spec)
    loaded, _ = lora_jax.load_adapter(lora_jax.save_adapter(tmp_path / "orbax", saved, spec), params=params)
    peft_spec = LoraSpec(rank=2, alpha=2.0, targets=["value", "mlp_out"], axes=axes)
    exported = init(21, params, peft_spec)
    imported, _ = lora_jax.import_peft(lora_jax.export_peft(tmp_path / "peft", exported, peft_spec), params, axes=axes)
    swapped = bank.replace(0, loaded, params=params).replace(2, imported, params=params)
    for i, lora in enumerate([loaded, adapters[1], imported]):
        check(select(swapped, i), lora)
    assert traces == {"forward": 1, "greedy": 1}


def test_mixed_batch_greedy_decoding_rows_equal_their_own_adapter(gpt_bank):
    params, adapters, bank = gpt_bank
    ids = jnp.array([2, -1, 0, 1])
    prompts = tokens_for(CFG, batch=4, seed=6)[:, :5]
    got = jax.jit(mixed_batch(greedy))(params, bank, ids, prompts)
    np.testing.assert_array_equal(got, reference_rows(greedy, params, adapters, ids, prompts))


# ------------------------------------------------------------------ bad input


def test_stack_refuses_an_empty_list_and_a_single_tree(x64, lora_case):
    with pytest.raises(
        ValueError, match=r"stack\(adapters=...\): expected at least one adapter tree, found an empty list"
    ):
        stack([])
    lora = lora_case[1][0]
    with pytest.raises(TypeError, match=r"expected a list of adapter trees.*stack\(\[lora\]\)"):
        stack(lora)


def test_stack_refuses_adapters_for_different_params(x64):
    params = mlp_params()
    other = {"up": {"kernel": jnp.ones((6, 8))}, "down": {"kernel": jnp.ones((8, 5))}}
    a = init(0, params, LoraSpec(rank=2))
    b = init(0, other, LoraSpec(rank=2))
    with pytest.raises(
        ValueError, match=r"stack: adapter 1 at (up|down)/kernel: expected the kernel shape of adapter 0"
    ):
        stack([a, b])
    with pytest.raises(
        ValueError, match=r"adapter 1 at (up|down)/kernel: expected factors for the base kernel of shape"
    ):
        stack([a, b], params=params)
    extra = {"side": {"kernel": lora_node(6, 5)}}
    with pytest.raises(ValueError, match=r"adapter 1 at side/kernel: expected a path of the params"):
        stack([a, extra], params=params)


def lora_node(i, o):
    return lora_jax.LoraWeights(jnp.zeros((i, 1)), jnp.zeros((1, o)))


def test_stack_refuses_different_layouts_at_one_path():
    sq = {"w": {"kernel": jnp.ones((4, 4))}}
    io = init(0, sq, LoraSpec(rank=1))
    oi = init(0, sq, LoraSpec(rank=1, axes={"w": "oi"}))
    with pytest.raises(
        ValueError, match=r"adapter 1 at w/kernel: expected the layout of adapter 0 there, 'io', found 'oi'"
    ):
        stack([io, oi])


def test_stack_refuses_a_leaf_trained_in_full():
    params = {"w": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}
    lora = init(0, params, LoraSpec(rank=1, targets=["w"], trainable=["head"]))
    with pytest.raises(TypeError, match=r"adapter 0 at head/kernel: expected a low-rank adapter node.*trained in full"):
        stack([lora])


def test_stack_needs_params_for_a_dora_path_some_adapter_lacks(x64, dora_case):
    _, adapters, _ = dora_case
    with pytest.raises(ValueError, match=r"up/kernel: expected the base params.*stack\(adapters, params=params\)"):
        stack(adapters)
    stack([adapters[2]])  # all-DoRA paths need no base


def test_ids_out_of_range_raise_when_concrete_and_give_nan_rows_under_jit(x64, dora_case):
    params, adapters, bank = dora_case
    x = jnp.ones((4, 6))
    with pytest.raises(
        IndexError, match=r"adapter_ids: expected ids in \[0, 4\) .* or -1 .*found \[-2, 4\] at example\(s\) \[1, 3\]"
    ):
        mixed_batch(mlp)(params, bank, jnp.array([0, -2, 1, 4]), x)
    with pytest.raises(ValueError, match=r"adapter_ids: expected one integer id per example, shape \(4,\)"):
        mixed_batch(mlp)(params, bank, jnp.array([0, 1]), x)
    got = jax.jit(mixed_batch(mlp))(params, bank, jnp.array([0, -2, 1, 4]), x)
    assert bool(jnp.all(jnp.isnan(got[1]))) and bool(jnp.all(jnp.isnan(got[3])))
    np.testing.assert_allclose(got[0], mlp(apply_lora(params, adapters[0]), x[:1])[0], atol=F64)
    with pytest.raises(IndexError, match=r"select\(i=...\): expected a slot in \[0, 4\), found int 4"):
        select(bank, 4)
    out = jax.jit(lambda i: select(bank, i)["down"]["kernel"].b)(7)
    assert bool(jnp.all(jnp.isnan(out)))


def test_replace_refuses_what_does_not_fit_the_bank(x64, lora_case):
    params, adapters, bank = lora_case
    big = init(0, params, LoraSpec(rank=5, targets=["up"], dtype="float64"))
    with pytest.raises(
        ValueError, match=r"the adapter at up/kernel: expected rank <= 3.*found a LoRA adapter of rank 5"
    ):
        bank.replace(0, big)
    dora = init(0, params, LoraSpec(rank=1, dora=True, targets=["up"], dtype="float64"))
    with pytest.raises(ValueError, match=r"no DoRA magnitude, found a DoRA adapter"):
        bank.replace(0, dora)
    with pytest.raises(IndexError, match=r"AdapterBank.replace\(i=...\): expected a slot in \[0, 5\)"):
        bank.replace(5, adapters[0])
    with pytest.raises(TypeError, match=r"mixed_batch\(fn\)\(bank=...\): expected an AdapterBank"):
        mixed_batch(mlp)(params, adapters[0], jnp.zeros(2, jnp.int32), jnp.ones((2, 6)))


# ------------------------------------------------------------------ 8 simulated devices, in a subprocess

SCRIPT = Path(__file__).parent / "sharded" / "multi_adapter_checks.py"


def test_sharded_mixed_batch_equals_unsharded_on_eight_devices():
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=xla_env(8), capture_output=True, text=True, timeout=300, cwd=SCRIPT.parent
    )
    out = proc.stdout + proc.stderr
    assert re.search(r"^PASSED multi_adapter$", out, flags=re.M), out[-6000:]
