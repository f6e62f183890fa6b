"""The benchmark's reference implementations of lora_jax.models.gpt.GPT (looped, not scanned).

* :func:`handwritten_forward`: the same decoder written by hand with every
  adapted kernel used as ``x·stop_gradient(W) + s·(x·A)·B``: the reachable
  limit for factored LoRA on this machine.
* :class:`NnxGPT`: the same decoder built from flax ``nnx.LoRALinear`` (the
  peer): q/k/v/o as ``(d, d)`` LoRALinear layers reshaped into heads.
* :class:`PlainNnxGPT`: the peer's model with plain ``nnx.Linear`` layers, so that
  ``lora_jax.factored`` can be compared with the peer on the same kernels.

All three follow ``GPTConfig.remat`` (each block recomputed in the backward
pass by ``jax.checkpoint``) and ``GPTConfig.attention_chunk``
(the same :func:`lora_jax.models.gpt.causal_attention` as the linen model).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from lora_jax.models.gpt import GPTConfig, causal_attention

_EQ = {"query": "btd,dhk->bthk", "key": "btd,dhk->bthk", "value": "btd,dhk->bthk", "out": "bthk,hkd->btd"}
_EQ.update({"mlp_in": "btd,df->btf", "mlp_out": "btf,fd->btd"})


def lora_term(eq: str, x: jax.Array, node) -> jax.Array:
    """``s * einsum(einsum(x, A), B)``: the adapter's part of ``einsum(eq, x, W + s·A·B)``."""
    ins, out = eq.split("->")
    xs, ws = ins.split(",")
    contracted = "".join(c for c in ws if c in xs)
    kept = "".join(c for c in ws if c not in xs)
    t = jnp.einsum(f"{xs},{contracted}r->{xs.replace(contracted, '')}r", x, node.a)
    return node.scale * jnp.einsum(f"{xs.replace(contracted, '')}r,r{kept}->{out}", t, node.b)


def _lora_einsum(eq: str, x: jax.Array, p: dict, node) -> jax.Array:
    """``einsum(x, W) + s * einsum(einsum(x, A), B)``, W frozen."""
    y = jnp.einsum(eq, x, jax.lax.stop_gradient(p["kernel"])) + p["bias"]
    return y if node is None else y + lora_term(eq, x, node)


def _layernorm(p: dict, x: jax.Array) -> jax.Array:
    return nn.LayerNorm().apply({"params": p}, x)


def _handwritten_block(p: dict, lo: dict, x: jax.Array, cfg: GPTConfig) -> jax.Array:
    node = lambda name: lo.get(name, {}).get("kernel")  # noqa: E731
    h = _layernorm(p["ln_attn"], x)
    q, k, v = (_lora_einsum(_EQ[n], h, p[n], node(n)) for n in ("query", "key", "value"))
    ctx = causal_attention(q, k, v, chunk=cfg.attention_chunk)
    x = x + _lora_einsum(_EQ["out"], ctx, p["out"], node("out"))
    h = _layernorm(p["ln_mlp"], x)
    h = nn.gelu(_lora_einsum(_EQ["mlp_in"], h, p["mlp_in"], node("mlp_in")))
    return x + _lora_einsum(_EQ["mlp_out"], h, p["mlp_out"], node("mlp_out"))


def handwritten_forward(params: dict, lora: dict, tokens: jax.Array, cfg: GPTConfig) -> jax.Array:
    """Logits of the linen GPT (``scan=False``) with factored adapters written out by hand."""
    x = params["tok_embed"]["embedding"][tokens] + params["pos_embed"]["embedding"][: tokens.shape[-1]]
    block = jax.checkpoint(_handwritten_block, static_argnums=3) if cfg.remat else _handwritten_block
    for i in range(cfg.layers):
        x = block(params[f"layers_{i}"], lora.get(f"layers_{i}", {}), x, cfg)
    x = _layernorm(params["ln_final"], x)
    return (x @ params["lm_head"]["kernel"] + params["lm_head"]["bias"]).astype(jnp.float32)


class NnxBlock(nnx.Module):
    """Pre-norm attention + MLP block from ``nnx.LoRALinear`` layers."""

    def __init__(self, cfg: GPTConfig, rank: int, rngs: nnx.Rngs):
        d = cfg.d_model
        lin = lambda i, o: nnx.LoRALinear(i, o, lora_rank=rank, rngs=rngs)  # noqa: E731
        self.cfg = cfg
        self.ln_attn, self.ln_mlp = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.mlp_in, self.mlp_out = lin(d, cfg.d_ff), lin(cfg.d_ff, d)

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        heads = lambda y: y.reshape(*y.shape[:-1], cfg.heads, cfg.head_dim)  # noqa: E731
        h = self.ln_attn(x)
        q, k, v = heads(self.query(h)), heads(self.key(h)), heads(self.value(h))
        ctx = causal_attention(q, k, v, chunk=cfg.attention_chunk)
        x = x + self.out(ctx.reshape(*ctx.shape[:-2], -1))
        return x + self.mlp_out(nnx.gelu(self.mlp_in(self.ln_mlp(x))))


def _remat_call(layer: nnx.Module, x: jax.Array, tunix_style: bool = False) -> jax.Array:
    """``layer(x)`` recomputed in the backward pass.

    By default with ``jax.checkpoint`` over the block's split state (passed in,
    not closed over), which ``jax.grad`` over a merged model's variables
    accepts. ``tunix_style``: ``nnx.remat`` of the unbound call, as tunix's
    models do; it keeps the module's path, which qwix's LoRA needs to find the
    projections (inside an ``nnx.split``/``merge`` it sees fresh modules and
    adapts none), but then the variables must be differentiated with
    ``nnx.value_and_grad`` (``jax.grad`` raises flax's ``TraceContextError``).
    """
    if tunix_style:
        return nnx.remat(type(layer).__call__)(layer, x)
    graphdef, state = nnx.split(layer)
    return jax.checkpoint(lambda s, y: nnx.merge(graphdef, s)(y))(state, x)


class NnxGPT(nnx.Module):
    """The decoder of lora_jax.models.gpt with nnx.LoRALinear on q, k, v, o and the MLP."""

    def __init__(self, cfg: GPTConfig, rank: int, rngs: nnx.Rngs):
        self.tunix_remat = False
        self.tok_embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.layers = nnx.List([NnxBlock(cfg, rank, rngs) for _ in range(cfg.layers)])
        self.ln_final = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.tok_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[-1]))
        for layer in self.layers:
            x = _remat_call(layer, x, self.tunix_remat) if layer.cfg.remat else layer(x)
        return self.lm_head(self.ln_final(x)).astype(jnp.float32)


class PlainNnxBlock(NnxBlock):
    """:class:`NnxBlock` with plain ``nnx.Linear`` layers (no adapters)."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        d = cfg.d_model
        lin = lambda i, o: nnx.Linear(i, o, rngs=rngs)  # noqa: E731
        self.cfg = cfg
        self.ln_attn, self.ln_mlp = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.query, self.key, self.value, self.out = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.mlp_in, self.mlp_out = lin(d, cfg.d_ff), lin(cfg.d_ff, d)


class PlainNnxGPT(NnxGPT):
    """:class:`NnxGPT` with plain ``nnx.Linear`` layers: the peer's model for ``lora_jax.factored``."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs, tunix_remat: bool = False):
        self.tunix_remat = tunix_remat  # remat blocks with nnx.remat, as tunix does (see _remat_call)
        self.tok_embed = nnx.Embed(cfg.vocab, cfg.d_model, rngs=rngs)
        self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
        self.layers = nnx.List([PlainNnxBlock(cfg, rngs) for _ in range(cfg.layers)])
        self.ln_final = nnx.LayerNorm(cfg.d_model, rngs=rngs)
        self.lm_head = nnx.Linear(cfg.d_model, cfg.vocab, rngs=rngs)
