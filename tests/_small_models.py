"""Small models and parameter trees for the tests (tiny sizes: CPU-fast)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_jax.models.gpt import GPT, GPTConfig, lora_axes

__all__ = [
    "GPT",
    "ConvNet",
    "NnxMLP",
    "gpt_config",
    "gpt_forward",
    "gpt_params",
    "gpt_shapes",
    "lora_axes",
    "random_like",
    "tokens_for",
]


def gpt_config(**changes) -> GPTConfig:
    """A tiny GPT: vocab 16, d_model 16, 2 heads, 2 layers."""
    base = {"vocab": 16, "d_model": 16, "heads": 2, "layers": 2, "d_ff": 32, "max_len": 8}
    return GPTConfig(**{**base, **changes})


def random_like(shapes, seed: int = 0, std: float = 0.2):
    """Real arrays for a tree of ``ShapeDtypeStruct``: N(0, std) weights, ones for norm scales, zeros for biases.

    Filled with NumPy, not by running flax's init: on a shared 2-core machine an XLA
    compile of a model's random init costs seconds, and the tests only need some
    fixed, non-trivial base weights.
    """
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = str(path[-1].key) if hasattr(path[-1], "key") else ""
        if name == "scale":
            x = np.ones(s.shape)
        elif name == "bias":
            x = np.zeros(s.shape)
        else:
            x = rng.normal(0.0, std, s.shape)
        return jnp.asarray(x.astype(s.dtype))  # NumPy casts (bfloat16 via ml_dtypes): no XLA op to compile

    return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.cache
def gpt_params(cfg: GPTConfig, seed: int = 0):
    """Base params of ``GPT(cfg)``: flax's shapes and dtypes (``jax.eval_shape``), random values (cached)."""
    return random_like(gpt_shapes(cfg), seed)


@functools.cache
def gpt_shapes(cfg: GPTConfig):
    """``jax.ShapeDtypeStruct`` params of ``GPT(cfg)``, from ``jax.eval_shape`` (the model never runs)."""
    tokens = jax.ShapeDtypeStruct((1, cfg.max_len), jnp.int32)
    return jax.eval_shape(GPT(cfg).init, jax.random.key(0), tokens)["params"]


class ConvNet(nn.Module):
    """Conv2D (3x3) -> mean pool -> Dense head."""

    features: int = 4
    classes: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(self.features, (3, 3), name="conv")(x))
        return nn.Dense(self.classes, name="head")(x.mean(axis=(1, 2)))


class NnxMLP(nnx.Module):
    """An NNX model: embedding -> Linear -> relu -> Linear head, with dropout rngs in its state."""

    def __init__(self, vocab: int, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.hidden = nnx.Linear(dim, hidden, rngs=rngs)
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, vocab, rngs=rngs)
        self.dropout = nnx.Dropout(0.0, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        x = nnx.relu(self.norm(self.hidden(x)))
        return self.head(self.dropout(x))


@functools.cache
def gpt_forward(cfg: GPTConfig):
    """A jitted ``(params, tokens) -> logits`` for ``GPT(cfg)``, shared by the tests (one compile per config)."""
    model = GPT(cfg)
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def tokens_for(cfg: GPTConfig, batch: int = 2, seed: int = 1) -> jax.Array:
    """Random token ids ``(batch, max_len)`` (NumPy: no random kernel to compile)."""
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab, (batch, cfg.max_len)), jnp.int32)
