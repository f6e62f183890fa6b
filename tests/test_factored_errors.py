"""factored(): loud errors for unfactorable uses, the materialize opt-in, and LoRA dropout."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_jax
from lora_jax import FactoredError, LoraWeights, factored


def _rand(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


PARAMS = {"dense": {"kernel": _rand(1, (6, 4)), "bias": _rand(2, (4,))}}
LORA = {"dense": {"kernel": LoraWeights(a=_rand(3, (6, 2)), b=_rand(4, (2, 4)), scale=0.75)}}
X = _rand(5, (3, 6))


@pytest.mark.parametrize(
    "use, primitive",
    [
        (lambda k: jnp.cumsum(k, axis=0), "cumsum"),
        (lambda k: jnp.sort(k, axis=0), "sort"),
        (lambda k: jnp.linalg.norm(k, axis=0), "mul"),
        (lambda k: k, "output of the function"),
    ],
    ids=["cumsum", "sort", "linalg.norm", "returned"],
)
def test_unfactorable_use_raises_naming_primitive_and_path(use, primitive):
    fn = lambda p, x: use(p["dense"]["kernel"])  # noqa: E731
    with pytest.raises(FactoredError, match=rf"dense/kernel: .*`{primitive}`.*materialize=\['dense/kernel'\]"):
        jax.eval_shape(lambda: factored(fn)(PARAMS, LORA, X))


@pytest.mark.parametrize(
    "use, message",
    [
        (
            lambda k: k.astype(jnp.bfloat16).astype(jnp.float32),
            r"convert_element_type from bfloat16 to float32 \(a cast to a wider dtype",
        ),
        (
            lambda k: jax.lax.reduce_precision(k, exponent_bits=8, mantissa_bits=7),
            r"reduce_precision \(exponent_bits=8, mantissa_bits=7\)",
        ),
        (
            lambda k: k.astype(jnp.float16).astype(jnp.bfloat16),
            r"convert_element_type from float16 to bfloat16 \(a cast that changes both",
        ),
        (lambda k: k.astype(jnp.int32), r"convert_element_type from float32 to int32 \(only casts to a narrower float"),
    ],
    ids=["bfloat16 round trip", "reduce_precision", "float16 to bfloat16", "to int32"],
)
def test_rounding_the_kernel_raises_naming_primitive_and_path(use, message):
    """The reference rounds W + s·A·B; factored could only round W (1e-3 off where float32 noise is 1e-6)."""
    fn = lambda p, x: x @ use(p["dense"]["kernel"]).astype(jnp.float32)  # noqa: E731
    with pytest.raises(FactoredError, match=rf"dense/kernel: .*`{message}.*materialize=\['dense/kernel'\]"):
        jax.eval_shape(lambda: factored(fn)(PARAMS, LORA, X))


def test_kernel_stored_narrower_than_it_is_computed_in_raises():
    """A bfloat16 kernel used in float32: apply_lora's kernel is round_bf16(W + s·A·B), factored's would not be."""
    params = jax.tree.map(lambda v: v.astype(jnp.bfloat16), PARAMS)
    fn = lambda p, x: x @ p["dense"]["kernel"].astype(jnp.float32)  # noqa: E731
    with pytest.raises(FactoredError, match=r"dense/kernel: .*convert_element_type from bfloat16 to float32"):
        jax.eval_shape(lambda: factored(fn)(params, LORA, X))


def test_reshape_mixing_input_and_output_axes_raises():
    fn = lambda p, x: x[:, :4] @ p["dense"]["kernel"].reshape(4, 6)  # noqa: E731
    with pytest.raises(FactoredError, match=r"dense/kernel: .*reshape.*\(6, 4\) to \(4, 6\)"):
        jax.eval_shape(lambda: factored(fn)(PARAMS, LORA, X))


def test_materialize_opt_in_forms_that_leaf_and_reports_it():
    fn = lambda p, x: x @ p["dense"]["kernel"] + jnp.cumsum(p["dense"]["kernel"], 0)[:3, :1]  # noqa: E731
    seen = []
    report = lambda path, prim: seen.append((path, prim))  # noqa: E731
    g = factored(fn, materialize=["dense/kernel"], on_materialize=report, strategy="factored")
    ref_fn = lambda lo: fn(lora_jax.apply_lora(PARAMS, lo), X)  # noqa: E731

    @jax.jit
    def both(lo):
        return (
            g(PARAMS, lo, X),
            jax.grad(lambda lo: g(PARAMS, lo, X).sum())(lo),
            jax.grad(lambda lo: ref_fn(lo).sum())(lo),
        )

    out, grads, ref_grads = both(LORA)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_fn(LORA)), rtol=1e-5, atol=1e-5)
    assert seen == [("dense/kernel", "cumsum")] * 2  # reported at every trace: the value, then the gradient
    assert g.explain(PARAMS, LORA, X) == {"dense/kernel": ("dot_general", "materialized (cumsum)")}
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_materialize_takes_regexes():
    fn = lambda p, x: jnp.sort(p["dense"]["kernel"], 0)  # noqa: E731
    out = factored(fn, materialize=r"dense/.*")(PARAMS, LORA, X)
    np.testing.assert_allclose(np.asarray(out), np.asarray(fn(lora_jax.apply_lora(PARAMS, LORA), X)), rtol=1e-6)


def _with_dropout(lora, p):
    return jax.tree.map(lambda n: dataclasses.replace(n, dropout=p), lora, is_leaf=lora_jax.is_adapter)


def test_lora_dropout_matches_closed_form_with_known_mask():
    p, key = 0.4, jax.random.key(3)
    fn = lambda prm, x: x @ prm["dense"]["kernel"] + prm["dense"]["bias"]  # noqa: E731
    g = factored(fn)  # the rate comes from the adapter
    out = jax.jit(lambda lo, k: g(PARAMS, lo, X, dropout_rng=k))(_with_dropout(LORA, p), key)
    mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 1 - p, X.shape), np.float64)
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    node = LORA["dense"]["kernel"]
    x, w, bias = f64(X), f64(PARAMS["dense"]["kernel"]), f64(PARAMS["dense"]["bias"])
    expected = x @ w + bias + 0.75 * ((mask * x / (1 - p)) @ f64(node.a)) @ f64(node.b)
    assert 0 < mask.sum() < mask.size
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-5)
    # deterministic (evaluation): no dropout, and the base path never sees the mask
    no_drop = factored(fn, deterministic=True)(PARAMS, _with_dropout(LORA, p), X)
    np.testing.assert_allclose(np.asarray(no_drop), np.asarray(fn(lora_jax.apply_lora(PARAMS, LORA), X)), rtol=1e-5)


def test_dropout_without_a_key_raises_unless_the_call_is_deterministic():
    fn = lambda prm, x: x @ prm["dense"]["kernel"]  # noqa: E731
    lora = _with_dropout(LORA, 0.1)
    with pytest.raises(
        ValueError, match=r"LoRA dropout \(1 kernel\(s\): dense/kernel \(0.1\)\) but the call got no dropout_rng"
    ):
        factored(fn)(PARAMS, lora, X)
    with pytest.raises(ValueError, match=r"deterministic=True\) was called with a dropout_rng"):
        factored(fn, deterministic=True)(PARAMS, lora, X, dropout_rng=jax.random.key(0))
    factored(fn)(PARAMS, LORA, X)  # no dropout recorded: no key needed


def test_the_spec_dropout_reaches_factored_through_the_adapter():
    fn = lambda prm, x: x @ prm["dense"]["kernel"]  # noqa: E731
    lora = lora_jax.init_lora(
        jax.random.key(0), PARAMS, lora_jax.LoraSpec(rank=2, targets=["dense"], dropout=0.3, init="random")
    )
    assert lora["dense"]["kernel"].dropout == 0.3
    key = jax.random.key(8)
    out = factored(fn)(PARAMS, lora, X, dropout_rng=key)
    node = lora["dense"]["kernel"]
    mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.7, X.shape), np.float64)
    x = np.asarray(X, np.float64)
    want = x @ np.asarray(PARAMS["dense"]["kernel"], np.float64) + node.scale * (
        (mask * x / 0.7) @ np.asarray(node.a, np.float64)
    ) @ np.asarray(node.b, np.float64)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_mismatched_adapter_raises_with_path():
    bad = {"dense": {"kernel": LoraWeights(a=_rand(3, (5, 2)), b=_rand(4, (2, 4)))}}
    with pytest.raises(ValueError, match=r"dense/kernel: the adapter fits a kernel of shape \(5, 4\)"):
        factored(lambda p, x: x @ p["dense"]["kernel"])(PARAMS, bad, X)


def test_lora_dropout_inside_scan_draws_a_mask_per_step():
    p, key = 0.5, jax.random.key(4)
    w = _rand(6, (2, 6, 6))
    node = LoraWeights(a=_rand(7, (2, 6, 2)), b=_rand(8, (2, 2, 6)), scale=0.5, layout="bio")
    fn = lambda prm, x: jax.lax.scan(lambda h, k: (h @ k, None), x, prm["k"])[0]  # noqa: E731
    node = dataclasses.replace(node, dropout=p)
    out = jax.jit(lambda lo, k: factored(fn)({"k": w}, lo, X, dropout_rng=k))({"k": node}, key)
    f64 = lambda v: np.asarray(v, np.float64)  # noqa: E731
    h = f64(X)
    for i in range(2):  # the scan is use 0; inside it, step i's first use has key fold_in(fold_in(key, 0), i), 0)
        step_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(key, 0), i), 0)
        mask = np.asarray(jax.random.bernoulli(step_key, 1 - p, h.shape), np.float64)
        h = h @ f64(w[i]) + 0.5 * ((mask * h / (1 - p)) @ f64(node.a[i])) @ f64(node.b[i])
    np.testing.assert_allclose(np.asarray(out), h, rtol=1e-4, atol=1e-4)


def test_lora_dropout_inside_while_loop_draws_a_mask_per_iteration():
    node = LoraWeights(a=_rand(9, (5, 2)), b=_rand(10, (2, 4)), scale=1.0, layout="io")
    w = _rand(11, (5, 4))
    x = _rand(12, (1, 5))

    def fn(prm, x):
        def body(c):
            i, rows = c
            return i + 1, rows.at[i].set((x @ prm["k"])[0])

        return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, jnp.zeros((3, 4))))[1]

    out = factored(fn)({"k": w}, {"k": dataclasses.replace(node, dropout=0.5)}, x, dropout_rng=jax.random.key(5))
    assert not np.allclose(out[0], out[1]) and not np.allclose(out[1], out[2])  # one mask per iteration
    plain = factored(fn)({"k": w}, {"k": node}, x)
    np.testing.assert_allclose(plain, fn({"k": node.apply_to(w)}, x), rtol=1e-5, atol=1e-5)


def test_lora_dropout_inside_cond_does_not_reuse_the_mask_of_an_earlier_use():
    node = LoraWeights(a=_rand(13, (5, 2)), b=_rand(14, (2, 4)), scale=1.0, layout="io")
    w = _rand(15, (5, 4))
    x = _rand(16, (1, 5))

    def fn(prm, x):
        first = x @ prm["k"]
        second = jax.lax.cond(True, lambda: x @ prm["k"], lambda: 2.0 * (x @ prm["k"]))
        return jnp.stack([first, second])

    out = factored(fn)({"k": w}, {"k": dataclasses.replace(node, dropout=0.5)}, x, dropout_rng=jax.random.key(6))
    assert not np.allclose(out[0], out[1])  # two uses, two independent masks


@jax.custom_vjp
def _ste_round(w):
    """Round to a 1/8 grid in the forward pass; straight-through (identity) gradient."""
    return jnp.round(w * 8.0) / 8.0


_ste_round.defvjp(lambda w: (_ste_round(w), None), lambda _, g: (g,))


def _quantized_model(p, x):
    return jnp.sum(jnp.tanh(x @ _ste_round(p["dense"]["kernel"])))


def _ste_case():
    params = {"dense": {"kernel": jax.random.normal(jax.random.key(0), (6, 5))}}
    spec = lora_jax.LoraSpec(rank=2, targets=["dense"], init="random")
    lora = lora_jax.init_lora(jax.random.key(1), params, spec)
    return params, lora, jax.random.normal(jax.random.key(2), (3, 6))


def test_kernel_reaching_a_custom_vjp_function_raises_naming_it_and_the_path():
    params, lora, x = _ste_case()
    with pytest.raises(lora_jax.FactoredError, match=r"dense/kernel: .*custom_vjp_call \(a jax.custom_vjp function"):
        lora_jax.factored(_quantized_model)(params, lora, x)


def test_materialized_custom_vjp_keeps_its_custom_gradient_rule():
    params, lora, x = _ste_case()
    seen = []
    fac = lora_jax.factored(_quantized_model, materialize=["dense/kernel"], on_materialize=lambda *a: seen.append(a))
    got = jax.grad(lambda lo: fac(params, lo, x))(lora)
    want = jax.grad(lambda lo: _quantized_model(lora_jax.apply_lora(params, lo), x))(lora)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert float(jnp.abs(jax.tree.leaves(got)[0]).max()) > 0  # the straight-through gradient, not round's zero
    assert seen and seen[0][0] == "dense/kernel" and "custom_vjp_call" in seen[0][1]


def test_kernel_reaching_a_custom_jvp_function_raises_naming_it():
    params, lora, x = _ste_case()
    relu_kernel = lambda p, x: x @ jax.nn.relu(p["dense"]["kernel"])  # noqa: E731  (jax.nn.relu is a custom_jvp)
    with pytest.raises(lora_jax.FactoredError, match=r"dense/kernel: .*custom_jvp_call \(a jax.custom_jvp function"):
        lora_jax.factored(relu_kernel)(params, lora, x)


def test_explain_traces_an_adapter_with_dropout_without_a_key():
    fn = lambda prm, x: x @ prm["dense"]["kernel"]  # noqa: E731
    assert factored(fn, strategy="factored").explain(PARAMS, _with_dropout(LORA, 0.2), X) == {
        "dense/kernel": ("dot_general",)
    }


TWO = {"dense": {"kernel": _rand(6, (6, 4))}, "out": {"kernel": _rand(7, (4, 3))}}
TWO_LORA = {
    "dense": {"kernel": LoraWeights(a=_rand(8, (6, 2)), b=_rand(9, (2, 4)), scale=0.5)},
    "out": {"kernel": LoraWeights(a=_rand(10, (4, 2)), b=_rand(11, (2, 3)), scale=0.5)},
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_function_using_only_some_adapted_kernels_still_runs(jit):
    fn = lambda prm, x: x @ prm["dense"]["kernel"]  # noqa: E731  out/kernel is adapted but unused
    wrapped = jax.jit(factored(fn)) if jit else factored(fn)
    y = wrapped(TWO, TWO_LORA, X)
    np.testing.assert_allclose(y, fn(lora_jax.apply_lora(TWO, TWO_LORA), X), rtol=1e-5, atol=1e-5)
    assert factored(fn, strategy="factored").explain(TWO, TWO_LORA, X) == {
        "dense/kernel": ("dot_general",),
        "out/kernel": (),
    }


def test_a_function_closing_over_an_unadapted_leaf_still_runs():
    bias = PARAMS["dense"]["bias"]
    fn = lambda prm, x: x @ prm["dense"]["kernel"] + bias  # noqa: E731  a closed-over leaf with no adapter
    y = factored(fn)(PARAMS, LORA, X)
    np.testing.assert_allclose(y, fn(lora_jax.apply_lora(PARAMS, LORA), X), rtol=1e-5, atol=1e-5)


def test_a_function_closing_over_the_params_raises_at_every_entry_point():
    closes = lambda prm, x: x @ PARAMS["dense"]["kernel"]  # noqa: E731
    for call in (
        lambda: factored(closes)(PARAMS, LORA, X),
        lambda: factored(closes).explain(PARAMS, LORA, X),
        lambda: jax.grad(lambda lo: factored(closes)(PARAMS, lo, X).sum())(LORA),
    ):
        with pytest.raises(ValueError, match=r"closes over the params: the adapted kernel\(s\) dense/kernel"):
            call()
    with pytest.raises(ValueError, match=r"uses none of the adapted kernels \(dense/kernel\)"):
        jax.jit(factored(closes))(PARAMS, LORA, X)  # params traced by the outer jit: the closure shows as no read


def test_a_materialize_entry_matching_no_adapted_path_raises_at_the_first_call():
    wrapped = factored(lambda prm, x: x @ prm["dense"]["kernel"], materialize=["dense/kernal"])
    with pytest.raises(ValueError, match=r"\[0\]: expected an adapted kernel's path.*'dense/kernal'.*dense/kernel"):
        wrapped(PARAMS, LORA, X)


def test_an_invalid_materialize_regex_raises_at_the_wrapper():
    with pytest.raises(ValueError, match=r"materialize=\.\.\.\)\[0\]: expected a valid regex, found 'dense/\['"):
        factored(lambda prm, x: x, materialize="dense/[")


def test_a_reference_model_built_from_the_same_base_params_is_not_a_closure_error():
    # DPO / KL-to-base losses: fn reads its weights from its argument and also runs the frozen base it closes over
    def apply(p, x):
        return x @ p["dense"]["kernel"] + p["dense"]["bias"]

    def kl_like(p, x):
        return jnp.sum((apply(p, x) - jax.lax.stop_gradient(apply(PARAMS, x))) ** 2)

    want = jax.value_and_grad(lambda lo: kl_like(lora_jax.apply_lora(PARAMS, lo), X))(LORA)
    for call in (lambda lo: factored(kl_like)(PARAMS, lo, X), jax.jit(lambda lo: factored(kl_like)(PARAMS, lo, X))):
        value, grads = jax.value_and_grad(call)(LORA)
        np.testing.assert_allclose(value, want[0], rtol=1e-5)
        np.testing.assert_allclose(grads["dense"]["kernel"].b, want[1]["dense"]["kernel"].b, rtol=1e-4, atol=1e-6)
    assert factored(kl_like)(PARAMS, LORA, X) == pytest.approx(float(want[0]), rel=1e-5)  # eager


def test_explain_reports_a_function_that_reads_no_adapted_kernel_instead_of_raising():
    head_only = lambda prm, x: x.sum() + prm["dense"]["bias"].sum()  # noqa: E731
    assert factored(head_only).explain(PARAMS, LORA, X) == {"dense/kernel": ()}
    with pytest.raises(ValueError, match=r"fn uses none of the adapted kernels \(dense/kernel\)"):
        factored(head_only)(PARAMS, LORA, X)
