"""The demo behind ``python -m lora_jax demo``: a complete LoRA fine-tune on CPU in a few minutes.

A small GPT (:mod:`lora_jax.models.gpt`) is pretrained on multi-digit addition
(every parameter trained), then adapted to subtraction with LoRA (a few percent
of the parameters trained, gradients taken with respect to the adapters only).
The demo reports exact-match accuracy before and after, the trainable share and
adapter size, and training speed; it saves the adapter with orbax, exports it in
PEFT format, reloads both and checks they reproduce the accuracy.

Modules: :mod:`~lora_jax.demo.tasks` (data), :mod:`~lora_jax.demo.model`
(loss, greedy decoding), :mod:`~lora_jax.demo.train` (loops),
:mod:`~lora_jax.demo.report` and :mod:`~lora_jax.demo.plot` (output),
:mod:`~lora_jax.demo.cli` (flags and the run).

>>> from lora_jax.demo.cli import parser
>>> args = parser().parse_args(["--finetune-steps", "50", "--mode", "materialized"])
>>> args.finetune_steps, args.mode, args.out
(50, 'materialized', 'lora_jax_demo_out')
"""

from lora_jax.demo.cli import main as main

__all__ = ["main"]
