"""lora_jax for flax NNX modules: adapters on a module's ``nnx.Param`` variables, everything else passed through.

Import it explicitly (``import lora_jax.nnx``; ``import lora_jax`` does not load flax). Four ways to use it:

- :func:`apply_lora` ``(module, lora)``: a new module with the adapted (merged) weights, for inference.
- :func:`with_lora` ``(module, lora)(x)``: the adapted call, NNX-style, inside ``nnx.jit`` / ``nnx.value_and_grad``;
  the module's rng counts, caches and batch stats advance as ``module(x)`` would.
- :func:`functional` ``(module)``: ``forward, params, rest``, a pure function for ``jax.jit`` / ``jax.grad`` loops,
  the recipe ``nnx.split(module, nnx.Param, ...)`` -> adapters -> ``nnx.merge`` in one place.
- :class:`LoraModel` ``(module, lora)``: one ``nnx.Module`` holding the adapters as ``nnx.LoRAParam``, for
  trainers that optimize ``wrt=nnx.LoRAParam`` (tunix's ``PeftTrainer``); ``.lora`` reads the adapters back.

>>> import jax, jax.numpy as jnp
>>> from flax import nnx
>>> import lora_jax, lora_jax.nnx
>>> model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
>>> lora = lora_jax.nnx.init_lora(jax.random.key(1), model, lora_jax.LoraSpec(rank=2))
>>> merged = lora_jax.nnx.apply_lora(model, lora)
"""

from lora_jax.nnx._adapt import apply_lora as apply_lora
from lora_jax.nnx._adapt import init_lora as init_lora
from lora_jax.nnx._call import with_lora as with_lora
from lora_jax.nnx._functional import Forward as Forward
from lora_jax.nnx._functional import Functional as Functional
from lora_jax.nnx._functional import functional as functional
from lora_jax.nnx._infer import infer_axes as infer_axes
from lora_jax.nnx._model import LoraFrozen as LoraFrozen
from lora_jax.nnx._model import LoraModel as LoraModel
