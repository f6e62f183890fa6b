"""tunix's ``PeftTrainer`` trains a lora_jax adapter held by ``lora_jax.nnx.LoraModel`` (``nnx.LoRAParam``).

The model is a tiny tunix Llama3 (2 layers, width 32) with adapters on every attention and MLP projection (the
attention kernels have three axes: ``infer_axes`` reads their layouts). The reference is an independent plain
JAX loop: the same optax optimizer on the same batches, the loss tunix's ``_default_loss_fn`` computes written
out here, gradients by ``jax.value_and_grad`` through ``lora_jax.nnx.functional``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from tunix.models.llama3 import model as llama3
from tunix.sft import peft_trainer

import lora_jax
import lora_jax.nnx as lnnx

VOCAB, BATCH, SEQ, STEPS = 64, 4, 8, 6
PROJECTIONS = r".*/(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/.*"
LR = 3e-2
# tunix 0.1.7 calls APIs that its jax, flax and optax deprecate (pxla.thread_resources, nnx.Param(sharding=...),
# optax.global_norm); lora_jax's own warnings stay errors
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:tunix"),
    pytest.mark.filterwarnings("ignore:'sharding' is deprecated, use 'out_sharding':DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:optax.global_norm is deprecated:DeprecationWarning"),
]


@functools.cache
def tiny_llama(remat: str = "NONE") -> llama3.Llama3:
    """One model per remat setting, shared by the tests: nothing here writes its Params (the tests check it)."""
    cfg = llama3.ModelConfig(
        num_layers=2, vocab_size=VOCAB, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=2,
        rope_theta=10_000, norm_eps=1e-5, remat_config=getattr(llama3.RematConfig, remat),
    )  # fmt: skip
    model = llama3.Llama3(cfg, rngs=nnx.Rngs(0))
    # tunix initialises for checkpoint loading (MLP kernels zero, the rest N(0, 0.01)): draw weights that compute
    rng = np.random.default_rng(0)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    drawn = [
        (path, jnp.asarray((1.0 if path[-1] == "input_embedding" else 0.2) * rng.standard_normal(v.shape), v.dtype))
        for path, v in flat
        if v.ndim >= 2
    ]
    nnx.update(model, nnx.from_flat_state(drawn))
    return model


def positions_and_mask(b: int, t: int) -> tuple[jax.Array, jax.Array]:
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    return positions, jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))


def call(model: nnx.Module, tokens: jax.Array) -> jax.Array:
    positions, mask = positions_and_mask(*tokens.shape)
    logits, _ = model(tokens, positions, None, mask)
    return logits


def spec_for(model: nnx.Module, **kw) -> lora_jax.LoraSpec:
    return lora_jax.LoraSpec(**{"rank": 2, "alpha": 4.0, "targets": PROJECTIONS, "axes": kernel_axes(model), **kw})


@functools.cache
def kernel_axes(model: nnx.Module) -> dict[str, str]:
    """The layouts ``infer_axes`` reads off the model's call (the attention kernels are ``ioo`` and ``iio``)."""
    graphdef, state = nnx.split(model)
    return lora_jax.infer_axes(lambda s, t: call(nnx.merge(graphdef, s), t), state, jnp.zeros((BATCH, SEQ), jnp.int32))


def dataset(steps: int = STEPS) -> list[dict[str, np.ndarray]]:
    """Counting sequences (token t+1 = token t + 1 mod V, random starts) with a padded tail: learnable."""
    rng = np.random.default_rng(0)
    positions, mask = positions_and_mask(BATCH, SEQ)
    out = []
    for _ in range(steps):
        start = rng.integers(0, VOCAB, (BATCH, 1))
        tokens = ((start + np.arange(SEQ)) % VOCAB).astype(np.int32)
        input_mask = np.ones((BATCH, SEQ), bool)
        input_mask[0, -2:] = False  # a padded tail: the loss skips it
        out.append(
            dict(
                input_tokens=tokens,
                input_mask=input_mask,
                positions=np.asarray(positions),
                attention_mask=np.asarray(mask),
            )
        )
    return out


def nll(logits: jax.Array, tokens: jax.Array, input_mask: jax.Array) -> jax.Array:
    """The next-token loss of tunix's ``_default_loss_fn``: summed masked NLL over the number of targets."""
    logp = jax.nn.log_softmax(logits[:, :-1])
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = input_mask[:, 1:].astype(logp.dtype)
    return -jnp.sum(picked * mask) / (jnp.sum(mask) + 1e-8)


def reference_training(model, lora, batches, tx, strategy="factored", dropout_rngs=None):
    """The plain JAX loop: ``(trained lora, losses)``; gradients and optimizer state over the trainable part only.

    ``dropout_rngs``: an ``nnx.Rngs`` whose ``dropout()`` keys, one per step, are the LoRA dropout keys.
    """
    forward, params, rest = lnnx.functional(model, strategy=strategy)
    trainable, frozen = lora_jax.split(lora)

    def loss(tr, rest, batch, key):
        logits, rest = forward(
            params, lora_jax.combine(tr, frozen), rest, batch["input_tokens"], batch["positions"], None,
            batch["attention_mask"], dropout_rng=key,
        )  # fmt: skip
        return nll(logits[0], batch["input_tokens"], batch["input_mask"]), rest

    @jax.jit
    def step(tr, opt_state, rest, batch, key):
        (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(tr, rest, batch, key)
        updates, opt_state = tx.update(grads, opt_state, tr)
        return optax.apply_updates(tr, updates), opt_state, rest, value

    opt_state, losses = tx.init(trainable), []
    for batch in batches:
        key = None if dropout_rngs is None else dropout_rngs.dropout()
        trainable, opt_state, rest, value = step(trainable, opt_state, rest, batch, key)
        losses.append(float(value))
    return lora_jax.combine(trainable, frozen), np.asarray(losses)


def train_with_tunix(model, lora, batches, tx, *, checkpoint_dir=None, strategy="factored", rngs=None):
    lm = lnnx.LoraModel(model, lora, strategy=strategy, rngs=rngs)
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10_000, max_steps=len(batches), checkpoint_root_directory=checkpoint_dir,
        pbar_description=None,
    )  # fmt: skip
    trainer = peft_trainer.PeftTrainer(lm, tx, config)
    trainer.train(batches)
    losses = np.asarray(trainer.metrics_logger.get_metric_history("", "loss", "train"))
    return lm, trainer, losses


def opt_state_size(trainer) -> int:
    """The number of elements the trainer's optimizer state holds in arrays (its step counts left out)."""
    leaves = jax.tree.leaves(nnx.state(trainer.optimizer, nnx.optimizer.OptState))
    return sum(x.size for x in leaves if x.ndim > 0)


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_trees_close(actual, desired, rtol=1e-5, atol=1e-6):
    """Adapter by adapter; the factors are O(0.1), so ``atol`` is a relative 1e-5 of their scale (float32 sums
    compiled under nnx.jit and under jax.jit round differently in the last bits)."""
    a, b = lora_jax.adapter_items(actual), lora_jax.adapter_items(desired)
    assert a.keys() == b.keys()
    for path in a:
        for field in ("a", "b"):
            np.testing.assert_allclose(
                np.asarray(getattr(a[path], field)), np.asarray(getattr(b[path], field)), rtol=rtol, atol=atol,
                err_msg=f"{path}/{field}",
            )  # fmt: skip


@pytest.mark.parametrize("remat", ["NONE", "BLOCK", "DECODER"])
def test_peft_trainer_trains_exactly_the_adapter(remat):
    model = tiny_llama(remat)
    lora = lnnx.init_lora(jax.random.key(1), model, spec_for(model))
    assert len(lora_jax.adapter_items(lora)) == 2 * 7
    base = snapshot(nnx.state(model, nnx.Param))
    lora0 = snapshot(lora)
    batches, tx = dataset(), optax.adam(LR)

    expected_lora, expected_losses = reference_training(model, lora, batches, tx)
    lm, trainer, losses = train_with_tunix(model, lora, batches, tx)

    assert trainer._lora_enabled  # tunix saw the LoRAParam variables: it optimizes and differentiates only them
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert losses[-3:].mean() < losses[0] - 0.5, losses  # the counting task is learnt
    assert_trees_close(lm.lora, expected_lora)
    # the base is bit-identical (its Params are never written) and so is the tree the model was made with
    jax.tree.map(np.testing.assert_array_equal, snapshot(nnx.state(lm.base, nnx.Param)), base)
    jax.tree.map(np.testing.assert_array_equal, snapshot(lora), lora0)
    # every adapter array moved; the optimizer holds state for the adapter only (Adam: two moments per array)
    start = lora_jax.adapter_items(lora0)
    for path, node in lora_jax.adapter_items(lm.lora).items():
        assert not np.array_equal(node.a, start[path].a) and not np.array_equal(node.b, start[path].b), path
    assert opt_state_size(trainer) == 2 * sum(x.size for x in jax.tree.leaves(lora))


def test_merged_strategy_matches_its_reference():
    """``strategy=None`` (the adapted weights formed per call, as apply_lora) trains to its own reference."""
    model = tiny_llama()
    lora = lnnx.init_lora(jax.random.key(1), model, spec_for(model))
    batches, tx = dataset(3), optax.sgd(0.5)
    expected_lora, expected_losses = reference_training(model, lora, batches, tx, strategy=None)
    lm, _, losses = train_with_tunix(model, lora, batches, tx, strategy=None)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_trees_close(lm.lora, expected_lora)


def test_lora_fa_keeps_a_frozen():
    model = tiny_llama()
    lora = lnnx.init_lora(jax.random.key(1), model, spec_for(model, freeze_a=True))
    lora0 = snapshot(lora)
    batches, tx = dataset(6), optax.adam(LR)
    expected_lora, expected_losses = reference_training(model, lora, batches, tx)
    lm, trainer, losses = train_with_tunix(model, lora, batches, tx)

    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lm, nnx.LoRAParam))}
    assert trained and all(p.endswith("/b") for p in trained), sorted(trained)
    frozen = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(lm, lnnx.LoraFrozen))}
    assert len(frozen) == len(trained) and all(p.endswith("/a") for p in frozen)
    assert opt_state_size(trainer) == 2 * sum(node.b.size for node in lora_jax.adapter_items(lora).values())
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_trees_close(lm.lora, expected_lora)
    for path, node in lora_jax.adapter_items(lm.lora).items():
        np.testing.assert_array_equal(node.a, lora_jax.adapter_items(lora0)[path].a)  # A: bit-identical
        assert np.abs(np.asarray(node.b)).max() > 0, path  # B trained (from zero)


def test_lora_dropout_draws_from_the_models_rngs():
    """With ``rngs=``, tunix's plain ``model(...)`` calls train with LoRA dropout, one key per step.

    (Without a key the factored call raises on a dropout adapter, so matching the keyed reference means the keys
    were drawn and used.)
    """
    model = tiny_llama()
    lora = lnnx.init_lora(
        jax.random.key(1), model, spec_for(model, dropout=0.5, targets=r".*/(q_proj|o_proj|down_proj)/.*")
    )
    batches, tx = dataset(4), optax.adam(LR)
    expected_lora, expected_losses = reference_training(model, lora, batches, tx, dropout_rngs=nnx.Rngs(dropout=3))
    lm, _, losses = train_with_tunix(model, lora, batches, tx, rngs=nnx.Rngs(dropout=3))
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_trees_close(lm.lora, expected_lora)
    assert int(lm.rngs.dropout.count[...]) == len(batches)
    tokens = jnp.asarray(batches[0]["input_tokens"])
    lm.eval()  # deterministic: no dropout, the adapted model itself
    jitted = nnx.jit(call)
    np.testing.assert_allclose(
        jitted(lm, tokens), jitted(lnnx.apply_lora(model, lm.lora), tokens), rtol=1e-4, atol=1e-5
    )
    assert int(lm.rngs.dropout.count[...]) == len(batches)


def test_vera_shared_projections_stay_frozen():
    model = tiny_llama()
    spec = dataclasses.replace(spec_for(model), targets=r".*/(gate_proj|up_proj|down_proj)/.*", vera=True)
    lora = lnnx.init_lora(jax.random.key(1), model, spec)
    lora0 = snapshot(lora)
    batches, tx = dataset(4), optax.adam(LR)
    expected_lora, _ = reference_training(model, lora, batches, tx)
    lm, _, _ = train_with_tunix(model, lora, batches, tx)
    got = lm.lora
    for name, value in lora0[lora_jax.SHARED].items():
        np.testing.assert_array_equal(got[lora_jax.SHARED][name], value)
    for path, node in lora_jax.adapter_items(got).items():
        want = lora_jax.adapter_items(expected_lora)[path]
        for a, b in zip(jax.tree.leaves(node), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=path)


def test_checkpoint_restores_the_adapter_and_the_model_exports(tmp_path):
    model = tiny_llama()
    spec = spec_for(model)
    batches, tx = dataset(4), optax.adam(LR)
    lm, _, _ = train_with_tunix(model, lnnx.init_lora(jax.random.key(1), model, spec), batches, tx,
                                checkpoint_dir=str(tmp_path))  # fmt: skip
    # a fresh LoraModel (new adapter) under a trainer on the same directory restores the trained LoRAParams
    fresh = lnnx.LoraModel(model, lnnx.init_lora(jax.random.key(7), model, spec))
    config = peft_trainer.TrainingConfig(
        eval_every_n_steps=10_000, max_steps=4, checkpoint_root_directory=str(tmp_path)
    )
    trainer = peft_trainer.PeftTrainer(fresh, tx, config)
    assert trainer.train_steps == 4
    assert_trees_close(fresh.lora, lm.lora, rtol=0, atol=0)
    trainer.close()
    # the adapter goes on as a lora_jax tree: merged into the base, it computes what the LoraModel computes
    tokens = jnp.asarray(batches[0]["input_tokens"])
    merged = lnnx.apply_lora(lm.base, lm.lora)
    np.testing.assert_allclose(call(merged, tokens), call(lm, tokens), rtol=1e-4, atol=1e-5)


def test_kv_cache_call_writes_back_like_the_base():
    """The sampler-style call ``model(tokens, positions, cache, mask)`` returns the cache the merged model does."""
    model = tiny_llama()
    lora = lnnx.init_lora(jax.random.key(1), model, spec_for(model, init="random"))
    lm = lnnx.LoraModel(model, lora)
    b, t, size = 2, 3, 8
    shape = (b, size, 2, 8)
    cache = {f"layer_{i}": {"k": jnp.zeros(shape), "v": jnp.zeros(shape), "end_index": jnp.zeros((b,), jnp.int32)}
             for i in range(2)}  # fmt: skip
    tokens = jnp.ones((b, t), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((t, size), bool)), (b, t, size))
    logits, new_cache = nnx.jit(lambda m, *a: m(*a))(lm, tokens, positions, cache, mask)
    want_logits, want_cache = nnx.jit(lambda m, *a: m(*a))(lnnx.apply_lora(model, lora), tokens, positions, cache, mask)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-5)
    for a, w in zip(jax.tree.leaves(new_cache), jax.tree.leaves(want_cache), strict=True):
        np.testing.assert_allclose(a, w, rtol=1e-4, atol=1e-5)
    assert int(new_cache["layer_0"]["end_index"][0]) == t


class CountingTokenizer:
    """What tunix's TokenizerAdapter asks of a tokenizer: encode, decode and the special ids.

    (``return_logits=True`` is left out below: tunix 0.1.7's Llama3 ``num_embed`` is its width, not its vocabulary,
    so the sampler's logits buffer has the wrong shape for the plain model too.)
    """

    def encode(self, text: str, **kwargs) -> list[int]:
        return [3 + ord(c) % (VOCAB - 3) for c in text]

    def decode(self, ids: list[int], **kwargs) -> str:
        return "".join(chr(97 + i % 26) for i in ids)

    def bos_id(self) -> int:
        return 1

    def eos_id(self) -> int:
        return 2

    def pad_id(self) -> int:
        return 0


def test_tunix_sampler_samples_the_adapted_model():
    from tunix.generate import sampler as sampler_lib

    model = tiny_llama()
    lora = lnnx.init_lora(jax.random.key(1), model, spec_for(model, init="random"))
    cache = sampler_lib.CacheConfig(cache_size=16, num_layers=2, num_kv_heads=2, head_dim=8)
    outs = [
        sampler_lib.Sampler(m, CountingTokenizer(), cache)(["abc", "hello"], max_generation_steps=4)
        for m in (lnnx.LoraModel(model, lora), lnnx.apply_lora(model, lora))
    ]
    for got, want in zip(outs[0].tokens, outs[1].tokens, strict=True):
        np.testing.assert_array_equal(got, want)


class HasLoraParam(nnx.Module):
    def __init__(self):
        self.dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
        self.adapter = nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(1))  # flax's own LoRA: nnx.LoRAParam variables

    def __call__(self, x):
        return self.dense(x) + self.adapter(x)


def test_bad_inputs_raise_clear_errors():
    linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    lora = lnnx.init_lora(jax.random.key(1), linear, lora_jax.LoraSpec(rank=2))
    with pytest.raises(TypeError, match=r"LoraModel\(module=...\): expected an nnx.Module, found State"):
        lnnx.LoraModel(nnx.state(linear), lora)
    with pytest.raises(TypeError, match=r"LoraModel\(lora=...\)"):
        lnnx.LoraModel(linear, nnx.state(linear))
    other = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"LoraModel\(lora=...\) at kernel: .*shape \(5, 3\).*shape \(4, 3\)"):
        lnnx.LoraModel(other, lora)
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"at kernel: expected an nnx.Param path of the Llama3"):
        lnnx.LoraModel(model, lora)
    base = HasLoraParam()
    lora_dense = lnnx.init_lora(jax.random.key(1), base, lora_jax.LoraSpec(rank=2, targets=["dense"]))
    with pytest.raises(ValueError, match=r"LoraModel\(module=...\) at adapter/lora_a: .*found an nnx.LoRAParam"):
        lnnx.LoraModel(base, lora_dense)
    with pytest.raises(ValueError, match=r"at trainable/kernel/a: .*found an nnx.LoRAParam"):
        lnnx.LoraModel(lnnx.LoraModel(linear, lora), lora)  # a LoraModel is no base
    with pytest.raises(ValueError, match=r"strategy"):
        lnnx.LoraModel(linear, lora, strategy="fast")
    with pytest.raises(AttributeError, match=r"method"):
        lnnx.LoraModel(linear, lora, method="decode")
    with pytest.raises(TypeError, match=r"LoraModel\(rngs=...\): expected None or an nnx.Rngs"):
        lnnx.LoraModel(linear, lora, rngs=jax.random.key(0))
    with pytest.raises(ValueError, match=r"LoraModel\(rngs=...\): expected None when strategy is None"):
        lnnx.LoraModel(linear, lora, strategy=None, rngs=nnx.Rngs(0))
    assert not hasattr(lnnx.LoraModel(linear, lora), "num_embed")  # read through only where the base has it
