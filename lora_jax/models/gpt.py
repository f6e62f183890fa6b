"""A small GPT-style decoder in flax linen, shaped like real LLM checkpoints.

Attention projections are ``DenseGeneral`` kernels with several axes:
query/key/value ``(d_model, heads, head_dim)`` (layout ``"ioo"``) and the
output ``(heads, head_dim, d_model)`` (layout ``"iio"``); the MLP uses
``Dense`` kernels ``(d_model, d_ff)`` and ``(d_ff, d_model)``. With
``scan=True`` the blocks are stacked with ``nn.scan`` and every kernel gains a
leading layer axis (layouts ``"bioo"``, ``"biio"``, ``"bio"``).

Two switches trade compute for memory the way long-sequence fine-tuning does,
without changing the parameters or the result: ``remat=True`` recomputes each
block in the backward pass (``nn.remat``, gradient checkpointing), and
``attention_chunk=c`` computes causal attention ``c`` queries at a time with
each chunk recomputed in the backward pass (:func:`causal_attention`), so the
``(heads, T, T)`` attention matrix is never stored whole.

Example:
  >>> import jax, jax.numpy as jnp
  >>> cfg = GPTConfig(vocab=32, d_model=16, heads=2, layers=2, d_ff=32, max_len=8)
  >>> model = GPT(cfg)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  >>> model.apply({"params": params}, jnp.zeros((1, 8), jnp.int32)).shape
  (1, 8, 32)
  >>> sorted(lora_axes(cfg))
  ['key', 'mlp_in', 'mlp_out', 'out', 'query', 'value']
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION = ("query", "key", "value", "out")
MLP = ("mlp_in", "mlp_out")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Sizes of the decoder."""

    vocab: int = 256
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    d_ff: int = 512
    max_len: int = 64
    scan: bool = False
    dtype: str = "float32"
    remat: bool = False
    attention_chunk: int | None = None

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


def lora_axes(cfg: GPTConfig) -> dict[str, str]:
    """The kernel layouts of the adaptable kernels, for ``LoraSpec(axes=...)``."""
    b = "b" if cfg.scan else ""
    return {
        "query": b + "ioo",
        "key": b + "ioo",
        "value": b + "ioo",
        "out": b + "iio",
        "mlp_in": b + "io",
        "mlp_out": b + "io",
    }


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, chunk: int | None = None) -> jax.Array:
    """Causal softmax attention over ``(..., T, heads, head_dim)`` queries, keys and values.

    Args:
      q: queries ``(..., T, heads, head_dim)``.
      k: keys, same shape as ``q``.
      v: values, same shape as ``q``.
      chunk: if given, queries are processed ``chunk`` at a time in a
        ``lax.map`` whose body is ``jax.checkpoint``-ed: the forward pass holds
        one ``(heads, chunk, T)`` block of scores, and the backward pass
        recomputes each block instead of storing all of them. ``None``
        computes the whole ``(heads, T, T)`` score matrix at once.

    Returns:
      The attention output, shaped like ``q``; equal (up to rounding) for every ``chunk``.

    Raises:
      ValueError: if ``chunk`` is not a positive integer dividing the sequence length.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 2, 8, 2, 4))
      >>> whole = causal_attention(q, k, v)
      >>> bool(jnp.allclose(causal_attention(q, k, v, chunk=4), whole, atol=1e-6))
      True
    """
    t, head_dim = q.shape[-3], q.shape[-1]
    root = jnp.sqrt(head_dim).astype(q.dtype)

    def block(q_block: jax.Array, first: jax.Array) -> jax.Array:
        logits = jnp.einsum("...qhd,...khd->...hqk", q_block, k) / root
        mask = (first + jnp.arange(q_block.shape[-3]))[:, None] >= jnp.arange(t)[None, :]
        logits = jnp.where(mask, logits, jnp.finfo(q.dtype).min)
        attn = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(q.dtype)
        return jnp.einsum("...hqk,...khd->...qhd", attn, v)

    if chunk is None or chunk >= t:
        return block(q, jnp.int32(0))
    if not isinstance(chunk, int) or chunk < 1 or t % chunk:
        raise ValueError(
            f"causal_attention: chunk={chunk} must be a positive integer that divides the sequence length {t} "
            f"(q.shape={q.shape}). "
            f"Hint: pick a divisor of {t}, or chunk=None to compute the whole score matrix."
        )
    lead = q.shape[:-3]
    blocks = jnp.moveaxis(q.reshape(*lead, t // chunk, chunk, *q.shape[-2:]), -4, 0)
    starts = jnp.arange(0, t, chunk, dtype=jnp.int32)
    out = jax.lax.map(jax.checkpoint(lambda qs: block(*qs)), (blocks, starts))
    return jnp.moveaxis(out, 0, -4).reshape(q.shape)


class Block(nn.Module):
    """Pre-norm attention + MLP block."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, x: jax.Array, _: None = None):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        h = nn.LayerNorm(dtype=dt, name="ln_attn")(x)
        proj = lambda name: nn.DenseGeneral((cfg.heads, cfg.head_dim), dtype=dt, name=name)  # noqa: E731
        q, k, v = proj("query")(h), proj("key")(h), proj("value")(h)
        ctx = causal_attention(q, k, v, chunk=cfg.attention_chunk)
        x = x + nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=dt, name="out")(ctx)
        h = nn.LayerNorm(dtype=dt, name="ln_mlp")(x)
        h = nn.gelu(nn.Dense(cfg.d_ff, dtype=dt, name="mlp_in")(h))
        x = x + nn.Dense(cfg.d_model, dtype=dt, name="mlp_out")(h)
        return (x, None) if cfg.scan else x


class GPT(nn.Module):
    """Token + position embeddings, ``layers`` blocks, final norm, untied LM head."""

    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x = nn.Embed(cfg.vocab, cfg.d_model, dtype=dt, name="tok_embed")(tokens)
        pos = nn.Embed(cfg.max_len, cfg.d_model, dtype=dt, name="pos_embed")(jnp.arange(tokens.shape[-1]))
        x = x + pos
        block = nn.remat(Block) if cfg.remat else Block
        if cfg.scan:
            stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.layers)
            x, _ = stack(cfg, name="layers")(x, None)
        else:
            for i in range(cfg.layers):
                x = block(cfg, name=f"layers_{i}")(x)
        x = nn.LayerNorm(dtype=dt, name="ln_final")(x)
        return nn.Dense(cfg.vocab, dtype=dt, name="lm_head")(x).astype(jnp.float32)


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean next-token cross-entropy (optionally over ``mask``)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    if mask is None:
        return nll.mean()
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1)
