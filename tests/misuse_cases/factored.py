"""Misuse cases for ``factored`` / ``Factored.explain`` / ``FactoredError`` (see tests/test_misuse.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lora_jax import FactoredError, LoraSpec, factored, init_lora

PARAMS = {"dense": {"kernel": jnp.ones((4, 3))}, "out": {"kernel": jnp.ones((3, 2))}}
LORA = init_lora(jax.random.key(0), PARAMS, LoraSpec(rank=2, targets=["dense", "out"], init="random"))
DROPOUT_LORA = init_lora(jax.random.key(0), PARAMS, LoraSpec(rank=2, targets=["dense"], dropout=0.1))
X = jnp.ones((5, 4))


def fn(p, x):
    return x @ p["dense"]["kernel"] @ p["out"]["kernel"]


def closes_over_params(p, x):
    del p
    return x @ PARAMS["dense"]["kernel"] @ PARAMS["out"]["kernel"]


def closes_over_one_kernel(p, x):
    return x @ p["dense"]["kernel"] @ PARAMS["out"]["kernel"]


def closes_inside_inner_jit(p, x):
    return jax.jit(lambda y: y @ PARAMS["dense"]["kernel"])(x) @ p["out"]["kernel"]


def reads_no_kernel(p, x):
    del p
    return x.sum()


def grad_of_closure():
    return jax.grad(lambda lo: factored(closes_over_params)(PARAMS, lo, X).sum())(LORA)


_SWAPPED = r"params: expected the base params.*found an adapter tree.*params first and the adapter tree second"
_CLOSURE = r"factored\(fn\): expected fn\(params, \*args\) to read its weights from its first argument"

CASES = [
    # the wrapper's own arguments
    ("params_given_as_fn", lambda: factored(PARAMS), TypeError, r"factored\(fn\): expected a function.*found dict"),
    ("int_as_fn", lambda: factored(3), TypeError, r"factored\(fn\): expected a function fn\(params.*found int 3"),
    (
        "materialize_int_entry",
        lambda: factored(fn, materialize=[3]),
        TypeError,
        r"factored\(materialize=\.\.\.\)\[0\]: expected a parameter path or regex \(a str\), found int 3",
    ),
    (
        "materialize_not_iterable",
        lambda: factored(fn, materialize=3),
        TypeError,
        r"factored\(materialize=\.\.\.\): expected a parameter path, a regex or a list of them, found int 3",
    ),
    (
        "materialize_invalid_regex",
        lambda: factored(fn, materialize=["dense/kernel", "dense/(kernel"]),
        ValueError,
        r"materialize=\.\.\.\)\[1\]: expected a valid regex, found 'dense/\(kernel' \(missing \).*re\.escape",
    ),
    (
        "materialize_typo_matches_no_path",
        lambda: factored(fn, materialize=["dense/kernal"])(PARAMS, LORA, X),
        ValueError,
        r"materialize=\.\.\.\)\[0\]: expected an adapted kernel's path.*found 'dense/kernal'.*nearest.*dense/kernel",
    ),
    (
        "materialize_typo_in_explain",
        lambda: factored(fn, materialize=["mlp/kernel"]).explain(PARAMS, LORA, X),
        ValueError,
        r"materialize=\.\.\.\)\[0\].*found 'mlp/kernel', which matches none of the 2 adapted",
    ),
    (
        "materialize_typo_under_jit",
        lambda: jax.jit(factored(fn, materialize="out/kernal+"))(PARAMS, LORA, X),
        ValueError,
        r"materialize=\.\.\.\)\[0\].*found 'out/kernal\+'.*nearest adapted paths: out/kernel",
    ),
    (
        "deterministic_str",
        lambda: factored(fn, deterministic="yes"),
        TypeError,
        r"factored\(deterministic=\.\.\.\): expected True or False, found str 'yes'",
    ),
    (
        "on_materialize_not_callable",
        lambda: factored(fn, on_materialize="print"),
        TypeError,
        r"factored\(on_materialize=\.\.\.\): expected a callable or None, found str 'print'",
    ),
    # the call's arguments
    ("lora_and_params_swapped", lambda: factored(fn)(LORA, PARAMS, X), TypeError, _SWAPPED),
    (
        "params_given_as_lora",
        lambda: factored(fn)(PARAMS, PARAMS, X),
        TypeError,
        r"lora at dense/kernel: expected an adapter node.*found ArrayImpl of shape \(4, 3\).*adapter tree second",
    ),
    (
        "lora_none",
        lambda: factored(fn)(PARAMS, None, X),
        TypeError,
        r"\(params, lora, \.\.\.\): lora: expected an adapter tree.*found NoneType None",
    ),
    ("explain_swapped", lambda: factored(fn).explain(LORA, PARAMS, X), TypeError, _SWAPPED),
    (
        "dropout_rng_int",
        lambda: factored(fn)(PARAMS, DROPOUT_LORA, X, dropout_rng=3),
        TypeError,
        r"dropout_rng: expected a PRNG key of shape \(\), found int 3.*jax\.random\.key\(seed\)",
    ),
    (
        "dropout_rng_batch_of_keys",
        lambda: factored(fn)(PARAMS, DROPOUT_LORA, X, dropout_rng=jax.random.split(jax.random.key(0), 3)),
        TypeError,
        r"dropout_rng: expected a PRNG key of shape \(\), found PRNGKeyArray of shape \(3,\)",
    ),
    (
        "dropout_rng_float_array",
        lambda: factored(fn)(PARAMS, LORA, X, dropout_rng=jnp.ones((2,))),
        TypeError,
        r"dropout_rng: expected a PRNG key.*found ArrayImpl of shape \(2,\) and dtype float32",
    ),
    # functions that cannot be factored: they do not read their weights from their first argument
    ("closure_over_params", lambda: factored(closes_over_params)(PARAMS, LORA, X), ValueError, _CLOSURE + r".*closes"),
    (
        "closure_over_params_explain",
        lambda: factored(closes_over_params).explain(PARAMS, LORA, X),
        ValueError,
        _CLOSURE + r".*adapted kernel\(s\) dense/kernel, out/kernel enter as constants.*zero gradients",
    ),
    (
        "closure_over_one_kernel",
        lambda: factored(closes_over_one_kernel)(PARAMS, LORA, X),
        ValueError,
        _CLOSURE + r".*kernel\(s\) out/kernel enter as constants",
    ),
    (
        "closure_inside_inner_jit",
        lambda: factored(closes_inside_inner_jit)(PARAMS, LORA, X),
        ValueError,
        _CLOSURE + r".*kernel\(s\) dense/kernel enter as constants",
    ),
    ("closure_under_grad", grad_of_closure, ValueError, _CLOSURE + r".*dense/kernel, out/kernel enter as constants"),
    (
        "closure_under_jit",
        lambda: jax.jit(factored(closes_over_params))(PARAMS, LORA, X),
        ValueError,
        _CLOSURE + r".*uses none of the adapted kernels \(dense/kernel, out/kernel\).*not from a closure",
    ),
    (
        "reads_no_adapted_kernel",
        lambda: factored(reads_no_kernel)(PARAMS, LORA, X),
        ValueError,
        _CLOSURE + r".*uses none of the adapted kernels \(dense/kernel, out/kernel\).*LoraSpec\(targets=",
    ),
    # a kernel reaching an operation that cannot be factored
    (
        "unfactorable_use_names_path_and_primitive",
        lambda: factored(lambda p, x: x @ jnp.sin(p["dense"]["kernel"]))(PARAMS, LORA, X),
        FactoredError,
        r"dense/kernel: factored\(\) cannot factor `sin`.*materialize=\['dense/kernel'\]",
    ),
]
