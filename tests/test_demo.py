"""The demo: its data, its decoding, its training modes, and a shortened end-to-end run."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import lora_jax
from lora_jax.demo import main, train
from lora_jax.demo import model as demo_model
from lora_jax.demo.tasks import Task, Tokenizer, decode_answer, is_held_out


@pytest.mark.parametrize("op", ["add", "sub"])
def test_task_text_matches_python_arithmetic(op):
    task = Task(op, digits=3)
    a, b = task.operands(np.random.default_rng(0), 500)
    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        text = task.text(x, y)
        prompt, answer = text[: task.prompt_len], text[task.prompt_len :]
        assert int(prompt[:3]) == x and int(prompt[4:7]) == y and prompt[3] == {"add": "+", "sub": "-"}[op]
        assert len(answer) == task.answer_len and decode_answer(answer) == (x + y if op == "add" else x - y)


def test_train_and_test_splits_are_disjoint():
    task = Task("add", digits=3)
    train_a, train_b = task.operands(np.random.default_rng(1), 20_000, split="train")
    test_a, test_b = task.operands(np.random.default_rng(2), 2_000, split="test")
    assert not is_held_out(train_a, train_b).any() and is_held_out(test_a, test_b).all()
    assert not set(zip(train_a.tolist(), train_b.tolist(), strict=True)) & set(
        zip(test_a.tolist(), test_b.tolist(), strict=True)
    )
    everything = np.arange(1000)
    share = is_held_out(np.repeat(everything, 1000), np.tile(everything, 1000)).mean()
    assert 0.05 < share < 0.075  # about 1 in 16 of all pairs


def test_tokenizer_rejects_unknown_characters():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        Tokenizer().encode("1*2")


def _oracle_apply(task: Task):
    """A stand-in model that reads the two operands from the prompt and predicts the true answer digits."""
    d, p = task.digits, task.prompt_len

    def apply(variables, tokens):
        del variables
        weights = 10 ** jnp.arange(d - 1, -1, -1)
        a = (tokens[:, :d] * weights).sum(-1)
        b = (tokens[:, d + 1 : 2 * d + 1] * weights).sum(-1)
        c = a + b if task.op == "add" else a - b
        digits = (c[:, None] // 10 ** jnp.arange(task.answer_len)) % 10  # least significant first
        logits = jnp.zeros((*tokens.shape, Tokenizer().size))
        rows = jnp.arange(tokens.shape[0])[:, None]
        return logits.at[rows, p - 1 + jnp.arange(task.answer_len)[None], digits].set(1.0)

    return apply


@pytest.mark.parametrize("op", ["add", "sub"])
def test_greedy_decoding_of_a_perfect_model_is_fully_accurate(op):
    task = Task(op, digits=3)
    seq = task.batch(np.random.default_rng(3), 64, split="test")
    answers = jax.jit(lambda p, s: demo_model.greedy_answers(_oracle_apply(task), p, s, task))
    assert demo_model.accuracy(answers, None, seq, task) == 1.0


def test_greedy_decoding_feeds_each_token_back():
    task = Task("add", digits=2)
    # predicts (token + 1) % 10 at every position: the answer must count up from the "=" token's successor
    apply = lambda v, t: jax.nn.one_hot((t + 1) % 10, Tokenizer().size)  # noqa: E731
    seq = jnp.asarray(task.batch(np.random.default_rng(4), 3))
    got = np.asarray(demo_model.greedy_answers(apply, None, seq, task))
    first = (Tokenizer().encode("=")[0] + 1) % 10
    np.testing.assert_array_equal(got, np.tile((first + np.arange(task.answer_len)) % 10, (3, 1)))


def test_factored_and_materialized_losses_agree():
    # the gradients of the two modes are compared on this GPT in tests/test_factored.py
    task = Task("sub", digits=2)
    model = demo_model.make_model(task, d_model=16, heads=2, layers=1)
    params = model.init(jax.random.key(0), jnp.zeros((1, task.seq_len - 1), jnp.int32))["params"]
    spec = lora_jax.LoraSpec(rank=2, alpha=4.0, axes=lora_jax.models.gpt.lora_axes(model.cfg), init="random")
    lora = lora_jax.init_lora(jax.random.key(1), params, spec)
    seq = jnp.asarray(task.batch(np.random.default_rng(5), 8))
    loss = {mode: jax.jit(train.adapter_loss(model, task, mode)) for mode in ("factored", "materialized")}
    factored, materialized = (loss[mode](lora, params, seq) for mode in ("factored", "materialized"))
    base = loss["materialized"](jax.tree_util.tree_map(jnp.zeros_like, lora), params, seq)
    np.testing.assert_allclose(factored, materialized, rtol=1e-5)
    assert abs(float(factored) - float(base)) > 1e-3  # the random adapter really changes the loss
    with pytest.raises(ValueError, match="expected 'factored' or 'materialized'"):
        train.adapter_loss(model, task, "fused")


def test_demo_runs_end_to_end(tmp_path, capsys):
    argv = [
        "--pretrain-steps",
        "30",
        "--finetune-steps",
        "20",
        "--d-model",
        "32",
        "--heads",
        "2",
        "--layers",
        "1",
        "--digits",
        "2",
        "--eval-size",
        "100",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "exact match, greedy decoding, 100 held-out problems" in out and "base + LoRA adapter" in out

    r = json.loads((tmp_path / "results.json").read_text())
    assert r["mode"] == "factored"
    for row in r["accuracy"].values():
        assert all(0.0 <= v <= 1.0 for v in row.values())
    acc = r["accuracy"]
    assert acc["base_before"] == acc["base_after"]  # the base is never modified
    assert acc["reloaded_orbax"]["sub"] == acc["reloaded_peft"]["sub"] == acc["adapted"]["sub"]
    assert all(r["checks"].values())
    assert r["pretrain"]["last_loss"] < r["pretrain"]["first_loss"]
    first, last = r["finetune"]["diagnostics_first"], r["finetune"]["diagnostics_last"]  # recorded every step
    assert first["norm_ratio"] == 0 and first["grad_ratio"] == 0  # B = 0 at init: no delta, and dA = 0
    assert last["norm_ratio"] > 0 and last["grad_ratio"] > 0 and last["effective_rank"] >= 1
    assert 0 < r["adapter"]["trainable_percent"] < 100 * r["adapter"]["params"] / r["model"]["params"] + 1e-9
    assert r["adapter"]["bytes"] == 4 * r["adapter"]["params"]

    assert (tmp_path / "loss_curves.png").read_bytes()[:4] == b"\x89PNG"
    lora, spec = lora_jax.load_adapter(tmp_path / "adapter")
    assert spec.rank == 2 and len(lora_jax.adapter_items(lora)) == 6
    config = json.loads((tmp_path / "peft_adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and config["peft_type"] == "LORA"
    tensors = load_file(tmp_path / "peft_adapter" / "adapter_model.safetensors")
    assert tensors["base_model.model.layers_0.query.lora_A.weight"].shape == (2, 32)  # (r, d_model)
    assert tensors["base_model.model.layers_0.query.lora_B.weight"].shape == (32, 2)  # (heads * head_dim, r)


def test_demo_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--finetune-steps", "0"])
    assert e.value.code == 2 and "--finetune-steps must be at least 1" in capsys.readouterr().err


def test_python_m_lora_jax_demo_reaches_the_demo():
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "lora_jax", "demo", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--pretrain-steps" in done.stdout and "--mode {auto,factored,materialized}" in done.stdout
