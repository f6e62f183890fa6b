"""The demo's model functions: the answer-only loss and greedy decoding.

The model is :class:`lora_jax.models.gpt.GPT`; a problem of ``seq_len``
tokens is fed as its first ``seq_len - 1`` tokens and every position predicts
the next token. Only the answer positions count, in the loss and in accuracy.

>>> from lora_jax.demo.tasks import Task
>>> task = Task("add", digits=2)  # "12+34=" then 3 answer digits
>>> make_model(task, d_model=16, heads=2, layers=1).cfg.max_len
8
>>> answer_mask(task, 1).tolist()  # positions 5..7 predict the answer tokens 6..8
[[0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.demo.tasks import Task, Tokenizer
from lora_jax.models.gpt import GPT, GPTConfig, cross_entropy


def make_model(task: Task, *, d_model: int, heads: int, layers: int, d_ff: int | None = None) -> GPT:
    """A :class:`GPT` sized for ``task`` (vocabulary and context length)."""
    cfg = GPTConfig(
        vocab=Tokenizer().size,
        d_model=d_model,
        heads=heads,
        layers=layers,
        d_ff=4 * d_model if d_ff is None else d_ff,
        max_len=task.seq_len - 1,
    )
    return GPT(cfg)


def answer_mask(task: Task, batch: int) -> jax.Array:
    """``(batch, seq_len - 1)`` float mask of the positions that predict answer tokens."""
    row = (jnp.arange(task.seq_len - 1) >= task.prompt_len - 1).astype(jnp.float32)
    return jnp.broadcast_to(row, (batch, task.seq_len - 1))


def answer_loss(logits_fn: Callable[[jax.Array], jax.Array], seq: jax.Array, task: Task) -> jax.Array:
    """Mean cross-entropy of the answer tokens of ``seq`` under ``logits_fn(tokens)``."""
    logits = logits_fn(seq[:, :-1])
    return cross_entropy(logits, seq[:, 1:], answer_mask(task, seq.shape[0]))


def greedy_answers(apply: Callable[..., jax.Array], params: Any, seq: jax.Array, task: Task) -> jax.Array:
    """The answer tokens the model writes for the prompts of ``seq``, greedy (argmax) decoding.

    Each answer token is chosen from the prompt and the tokens chosen before
    it; the answers in ``seq`` are never shown to the model.

    Args:
      apply: ``model.apply``.
      params: the model's parameters.
      seq: ``(n, seq_len)`` problems; only their prompts are read.
      task: the task ``seq`` was made from.

    Returns:
      ``(n, answer_len)`` int32 tokens.
    """
    p = task.prompt_len
    tokens = seq[:, :-1].at[:, p:].set(0)  # hide the answer

    def write(k: int, toks: jax.Array) -> jax.Array:
        logits = apply({"params": params}, toks)
        nxt = jnp.argmax(logits[:, p - 1 + k], axis=-1).astype(toks.dtype)
        return jax.lax.dynamic_update_slice_in_dim(toks, nxt[:, None], p + k, axis=1)

    tokens = jax.lax.fori_loop(0, task.answer_len - 1, write, tokens)
    last = jnp.argmax(apply({"params": params}, tokens)[:, -1], axis=-1).astype(tokens.dtype)
    return jnp.concatenate([tokens[:, p:], last[:, None]], axis=1)


def accuracy(answer_fn: Callable[[Any, jax.Array], jax.Array], params: Any, seq: np.ndarray, task: Task) -> float:
    """Exact-match accuracy: the fraction of problems whose whole answer is right.

    ``answer_fn(params, seq)`` is (a jitted) :func:`greedy_answers` bound to a model and task.
    """
    got = np.asarray(answer_fn(params, jnp.asarray(seq)))
    return float(np.mean(np.all(got == seq[:, task.prompt_len :], axis=1)))
