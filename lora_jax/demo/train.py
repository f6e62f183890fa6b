"""The demo's training loops: full pretraining, then adapter-only fine-tuning.

Both loops draw fresh training problems every step (never from the held-out
test split), run a jitted step, show a tqdm progress bar, and return the
per-step losses and the speed measured after the first (compiling) step.

>>> lr = schedule(1000, 1e-3)
>>> [round(float(lr(step)), 8) for step in (0, 50, 1000)]
[0.0, 0.001, 5e-05]
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import lora_jax
from lora_jax.demo.model import answer_loss
from lora_jax.demo.tasks import Task
from lora_jax.models.gpt import GPT


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training loop returns."""

    state: Any  # the trained params (pretraining) or adapter tree (fine-tuning)
    losses: np.ndarray  # (steps,) float32
    seconds: float  # wall time of all steps, compile included
    steps_per_second: float  # after the first (compiling) step; nan with fewer than 2 steps
    metrics: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # per-step scalars (fine-tuning)


def schedule(steps: int, lr: float) -> optax.Schedule:
    """Linear warm-up over the first 5% of steps, then cosine decay to 5% of ``lr``."""
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(steps // 20, 1), max(steps, 2), lr * 0.05)


def _loop(
    step: Callable,
    state: Any,
    opt_state: Any,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    seed: int,
    desc: str,
    progress: bool,
    frozen: Any = None,
) -> Run:
    rng = np.random.default_rng(seed)
    losses, metrics = [], []
    start = time.perf_counter()
    warm = start
    with tqdm(total=steps, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=True) as bar:
        for i in range(steps):
            seq = jnp.asarray(task.batch(rng, batch_size, split="train"))
            state, opt_state, loss, *extra = step(state, opt_state, frozen, seq)
            losses.append(loss)
            metrics.extend(extra)
            if i == 0:
                jax.block_until_ready(loss)
                warm = time.perf_counter()
            if i % 25 == 0 or i == steps - 1:
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            bar.update(1)
    jax.block_until_ready(state)
    end = time.perf_counter()
    sps = (steps - 1) / (end - warm) if steps > 1 else float("nan")
    losses_np = np.asarray(jax.device_get(jnp.stack(losses)) if losses else np.zeros(0), np.float32)
    per_step = {
        k: np.asarray(jax.device_get(jnp.stack([m[k] for m in metrics]))) for k in (metrics[0] if metrics else {})
    }
    return Run(state=state, losses=losses_np, seconds=end - start, steps_per_second=sps, metrics=per_step)


def diagnostics(params: Any, lora: Any, grads: Any) -> dict[str, jax.Array]:
    """The per-step scalars the demo records: :func:`lora_jax.diagnose`'s norm and gradient ratios, averaged
    over the adapted kernels, and the smallest effective rank."""
    report = lora_jax.diagnose(params, lora, grads)
    mean = lambda key: jnp.mean(jnp.stack([jnp.mean(m[key]) for m in report.values() if key in m]))  # noqa: E731
    ranks = jnp.stack([jnp.min(m["effective_rank"]) for m in report.values()])
    return {"norm_ratio": mean("norm_ratio"), "grad_ratio": mean("grad_ratio"), "effective_rank": jnp.min(ranks)}


def pretrain(
    model: GPT, params: Any, task: Task, *, steps: int, batch_size: int, lr: float, seed: int, progress: bool = True
) -> Run:
    """Train every parameter of ``model`` on ``task`` with AdamW."""
    tx = optax.adamw(schedule(steps, lr), weight_decay=0.01)

    @jax.jit
    def step(params, opt_state, _, seq):
        loss, grads = jax.value_and_grad(lambda p: answer_loss(lambda t: model.apply({"params": p}, t), seq, task))(
            params
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return _loop(
        step,
        params,
        tx.init(params),
        task,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        desc=f"pretrain ({task.op})",
        progress=progress,
    )


def adapter_loss(model: GPT, task: Task, mode: str) -> Callable[[Any, Any, jax.Array], jax.Array]:
    """The fine-tuning loss ``loss(lora, params, seq)`` of the adapted model.

    ``mode="factored"`` runs the model through :func:`lora_jax.factored`
    (its default strategy: each kernel use as ``x·W + s·(x·A)·B`` or formed per
    use, and no weight gradient); ``mode="materialized"`` runs it on :func:`lora_jax.apply_lora`'s
    effective weights. Both give the same value and adapter gradients.
    """
    apply = lambda p, t: model.apply({"params": p}, t)  # noqa: E731
    if mode == "factored":
        run_model = lora_jax.factored(apply)
    elif mode == "materialized":
        run_model = lambda p, lo, t: apply(lora_jax.apply_lora(p, lo), t)  # noqa: E731
    else:
        raise ValueError(f"mode={mode!r}: expected 'factored' or 'materialized'.")

    def loss(lora: Any, params: Any, seq: jax.Array) -> jax.Array:
        return answer_loss(lambda t: run_model(params, lora, t), seq, task)

    return loss


def finetune(
    model: GPT,
    params: Any,
    lora: Any,
    task: Task,
    *,
    mode: str,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: bool = True,
) -> Run:
    """Train only the adapter tree ``lora`` on ``task``; ``params`` stay frozen.

    The gradient is taken with respect to the adapters alone (no base
    gradient, no base optimizer state); ``mode`` is as in :func:`adapter_loss`.
    Every step also records :func:`diagnostics` (``Run.metrics``), computed
    from the factors inside the jitted step.
    """
    loss_fn = adapter_loss(model, task, mode)
    tx = lora_jax.only_adapters(optax.adamw(schedule(steps, lr), weight_decay=0.0))

    @jax.jit
    def step(lora, opt_state, params, seq):
        loss, grads = jax.value_and_grad(loss_fn)(lora, params, seq)  # gradient wrt the adapters only
        updates, opt_state = tx.update(grads, opt_state, lora)
        return optax.apply_updates(lora, updates), opt_state, loss, diagnostics(params, lora, grads)

    return _loop(
        step,
        lora,
        tx.init(lora),
        task,
        steps=steps,
        batch_size=batch_size,
        seed=seed,
        desc=f"LoRA fine-tune ({task.op}, {mode})",
        progress=progress,
        frozen=params,
    )
