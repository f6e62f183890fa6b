"""Misuse cases for combine_adapters (issue #15, weighted combination)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

import lora_jax as lj

KEY = jax.random.key(0)
PARAMS = {"dense": {"kernel": jnp.ones((4, 3))}, "head": {"kernel": jnp.ones((3, 2))}}


def _lora(rank=2, **kw):
    return lj.init_lora(KEY, PARAMS, lj.LoraSpec(rank=rank, targets=["dense"], **kw))


def _combine(adapters=None, weights=(1.0, 1.0), **kw):
    return lambda: lj.combine_adapters([_lora(), _lora()] if adapters is None else adapters(), weights, **kw)


def _with_trainable():
    return [_lora(trainable=["head"]), _lora(trainable=["head"])]


# (name, call, error type, regex of the words that matter)
CASES = [
    ("combine_weights_short", _combine(weights=[1.0], method="cat"), ValueError,
     r"combine_adapters\(weights=\.\.\.\): expected 2 numbers, one per adapter, found list \[1.0\]"),
    ("combine_weights_string", _combine(weights="11", method="cat"), ValueError,
     r"weights=\.\.\.\): expected 2 numbers.*found str '11'"),
    ("combine_unknown_method", _combine(method="average"), ValueError,
     r"method=\.\.\.\): expected one of 'cat', 'svd', 'linear'.*found str 'average'"),
    ("combine_svd_rank_above_combined", _combine(method="svd", rank=5), ValueError,
     r"rank=\.\.\.\) at dense/kernel: expected at most the combined rank 4 \(ranks \[2, 2\]\), found int 5.*cat"),
    ("combine_svd_rank_above_kernel", _combine(adapters=lambda: [_lora(3), _lora(3)], method="svd", rank=4),
     ValueError, r"rank=\.\.\.\) at dense/kernel: expected at most min\(fan_in, fan_out\) = 3, found int 4"),
    ("combine_linear_unequal_ranks", _combine(adapters=lambda: [_lora(2), _lora(1)], method="linear"), ValueError,
     r"method='linear'\) at dense/kernel: expected adapters of equal rank.*found ranks \[2, 1\].*'cat'"),
    ("combine_rank_with_linear", _combine(method="linear", rank=2), ValueError,
     r"rank=\.\.\.\): expected None with method='linear'.*truncation rank"),
    ("combine_rank_zero", _combine(method="svd", rank=0), ValueError, r"rank=\.\.\.\): expected a positive int"),
    ("combine_density_missing", _combine(method="magnitude_prune"), ValueError,
     r"density=\.\.\.\): expected a number with 0 <= density <= 1.*found NoneType None"),
    ("combine_density_above_one", _combine(method="ties", density=1.5), ValueError,
     r"density=\.\.\.\): expected a number with 0 <= density <= 1 for method='ties', found float 1.5"),
    ("combine_dare_density_zero", _combine(method="dare_linear", density=0.0, key=KEY), ValueError,
     r"density=\.\.\.\): expected a number with 0 < density <= 1 \(DARE rescales by 1 / density\)"),
    ("combine_density_with_cat", _combine(method="cat", density=0.5), ValueError,
     r"density=\.\.\.\): expected None with method='cat'"),
    ("combine_majority_sign_typo", _combine(method="ties", density=0.5, majority_sign="count"), ValueError,
     r"majority_sign=\.\.\.\): expected 'total' or 'frequency', found str 'count'"),
    ("combine_dare_without_key", _combine(method="dare_ties", density=0.5), TypeError,
     r"combine_adapters\(key=\.\.\.\): expected a JAX PRNG key, found NoneType None"),
    ("combine_key_with_masks", _combine(method="dare_ties", density=0.5, key=KEY, masks=[{}, {}]), ValueError,
     r"key=\.\.\.\): expected None when masks are given"),
    ("combine_key_with_ties", _combine(method="ties", density=0.5, key=KEY), ValueError,
     r"key=\.\.\.\): expected None with method='ties'.*DARE"),
    ("combine_masks_missing_path", _combine(method="dare_linear", density=0.5, masks=[{}, {}]), ValueError,
     r"masks\[0\]\) at dense/kernel: expected a mask, found none"),
    ("combine_not_a_list", lambda: lj.combine_adapters(_lora(), [1.0], method="cat"), TypeError,
     r"adapters=\.\.\.\): expected a non-empty list of adapter trees, found dict"),
    ("combine_empty", lambda: lj.combine_adapters([], [], method="cat"), TypeError,
     r"adapters=\.\.\.\): expected a non-empty list of adapter trees, found list \[\]"),
    ("combine_different_params",
     _combine(adapters=lambda: [_lora(), lj.init_lora(KEY, PARAMS, lj.LoraSpec(rank=2, targets=["head"]))],
              method="cat"), ValueError,
     r"adapters\[1\]\): expected adapters of the same params as adapters\[0\].*no adapter at dense/kernel"),
    ("combine_trainable_leaf", _combine(adapters=_with_trainable, method="cat"), ValueError,
     r"adapters\[0\]\) at head/kernel: expected a low-rank adapter, found a leaf trained in full"),
    ("combine_dora", _combine(adapters=lambda: [_lora(dora=True), _lora(dora=True)], method="cat"), ValueError,
     r"adapters\[0\]\) at dense/kernel: expected a low-rank adapter without a magnitude, found a DoRA adapter"),
]  # fmt: skip
