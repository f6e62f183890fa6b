"""``LoraModel``: a base module and its adapters as one ``nnx.Module``, the adapters as ``nnx.LoRAParam`` variables.

What trainers written for flax's own LoRA expect (tunix's ``PeftTrainer``, ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``, ``nnx.DiffState(0, nnx.LoRAParam)``): the model holds its trainable arrays as
``nnx.LoRAParam``. A lora_jax adapter tree is a pytree, so ``LoraModel`` stores its arrays as variables (the
trainable ones per :func:`lora_jax.split` as ``LoRAParam``, the frozen ones as :class:`LoraFrozen`, which no
Param filter selects) and its structure statically, and calls the base through :func:`run_method`, as
:func:`with_lora` does: the base's Params are read, never written.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from lora_jax.adapters._split import combine, split
from lora_jax.errors._messages import expected
from lora_jax.nnx._run import check_method, check_strategy, run_method
from lora_jax.nnx._state import check_fits, check_module, split_params


class LoraFrozen(nnx.Variable):
    """An adapter array that does not train (LoRA-FA's A, VeRA's shared projections): not an ``nnx.Param``.

    No ``nnx.Param`` / ``nnx.LoRAParam`` filter selects it, so no optimizer, gradient or weight decay reaches
    it (and tunix's LoRA-only checkpoints do not save it: it is rebuilt from the adapter the model was made
    with).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> spec = lora_jax.LoraSpec(rank=2, freeze_a=True)
      >>> model = lora_jax.nnx.LoraModel(base, lora_jax.nnx.init_lora(jax.random.key(1), base, spec))
      >>> [type(v).__name__ for v in jax.tree.leaves(nnx.state(model, lora_jax.nnx.LoraFrozen), is_leaf=lambda x: isinstance(x, nnx.Variable))]
      ['LoraFrozen']
    """


#: The base's attributes a LoraModel reads through (what tunix's ``Sampler`` asks of the model it samples).
FORWARDED = ("config", "num_embed", "init_cache", "get_attention_mask")


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _names(tree: Any) -> tuple[tuple[tuple[str, ...], ...], jax.tree_util.PyTreeDef, list[Any]]:
    """The leaves of ``tree`` (``None`` holes dropped), their key paths as strings, and the treedef."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = tuple(tuple(_key_name(k) for k in path) for path, _ in flat)
    return names, treedef, [leaf for _, leaf in flat]


def _nest(names: tuple[tuple[str, ...], ...], values: list[nnx.Variable]) -> nnx.Dict:
    """Nested ``nnx.Dict``s holding ``values`` at ``names`` (so state paths read ``layers/0/attn/q_proj/w/a``)."""
    root: dict[str, Any] = {}
    for name, value in zip(names, values, strict=True):
        node = root
        for part in name[:-1]:
            node = node.setdefault(part, {})
        node[name[-1]] = value

    def build(node: dict[str, Any]) -> nnx.Dict:
        return nnx.Dict({k: build(v) if isinstance(v, dict) else v for k, v in node.items()})

    return build(root)


def _read(holder: nnx.Dict, names: tuple[tuple[str, ...], ...]) -> list[Any]:
    out = []
    for name in names:
        node = holder
        for part in name:
            node = node[part]
        out.append(node[...])
    return out


def _refuse_lora_params(where: str, module: nnx.Module) -> None:
    for path, value in nnx.iter_graph(module):
        if isinstance(value, (nnx.LoRAParam, LoraFrozen)):
            at = "/".join(str(p) for p in path)
            raise ValueError(
                expected(
                    f"{where}(module=...) at {at}",
                    "a base module whose Params are plain nnx.Param (the adapters live in the LoraModel)",
                    f"an nnx.{type(value).__name__} variable (a qwix- or nnx.LoRA-adapted model, or a LoraModel)",
                    "Pass the model before qwix.apply_lora_to_model / nnx.LoRA; for a qwix model, "
                    "lora_jax.from_qwix converts its adapters into a lora_jax tree",
                    found_is_text=True,
                )
            )


def _check_rngs(where: str, rngs: Any, strategy: str | None) -> None:
    if rngs is None:
        return
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(expected(f"{where}(rngs=...)", "None or an nnx.Rngs", rngs, "pass e.g. nnx.Rngs(dropout=0)"))
    if strategy is None:
        raise ValueError(
            expected(
                f"{where}(rngs=...)",
                "None when strategy is None (apply_lora applies no LoRA dropout)",
                "an nnx.Rngs",
                "pass strategy='factored' to train with LoRA dropout",
                found_is_text=True,
            )
        )


class LoraModel(nnx.Module):
    """A base module with lora_jax adapters, trainable as flax's LoRA: ``nnx.LoRAParam`` variables.

    ``LoraModel(model, lora)(x)`` is the adapted ``model(x)``; the adapters' trainable arrays are
    ``nnx.LoRAParam`` variables of the LoraModel and the base keeps its plain ``nnx.Param``, so what optimizes
    ``wrt=nnx.LoRAParam`` trains exactly the adapter: tunix's ``PeftTrainer(LoraModel(model, lora), tx,
    config).train(ds)``, or ``nnx.Optimizer(lm, tx, wrt=nnx.LoRAParam)`` with
    ``nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))``. Frozen adapter arrays (LoRA-FA's
    A, VeRA's shared projections) are :class:`LoraFrozen` variables, which nothing trains. Each call runs the
    base's ``method`` through :func:`lora_jax.factored` (or the merged weights with ``strategy=None``) and
    writes back what it changed outside the Params (rng counts, KV caches), as :func:`with_lora` does; the
    base's Params are never written. ``.lora`` is the current adapter tree, to save, export or merge.

    Args:
      module: the base ``nnx.Module``; it becomes ``.base`` (not copied: its rng and cache state advance).
      lora: an adapter tree for its Params (from :func:`init_lora`); its arrays are held, not written to.
      strategy: ``"factored"`` (default), ``"auto"`` or ``"dense"``: through :func:`lora_jax.factored` with
        that strategy (LoRA dropout with the call's ``dropout_rng=`` keyword); ``None``: the adapted weights
        formed once per call, as :func:`apply_lora`.
      method: the name of the base's method a call runs.
      rngs: an ``nnx.Rngs`` for LoRA dropout (``LoraSpec(dropout=...)``): a call given no ``dropout_rng``
        draws one from its ``dropout`` stream (its count advances inside ``nnx.jit``, as ``nnx.Dropout``'s
        does), so trainers that just call ``model(...)`` train with dropout. ``None`` (default): LoRA dropout
        only with ``dropout_rng=``. Either way ``model.eval()`` (``deterministic=True``) turns LoRA dropout
        off and ``model.train()`` back on.

    The base's ``config``, ``num_embed``, ``init_cache`` and ``get_attention_mask``, where it has them, are read
    through (:data:`FORWARDED`), so tunix's ``Sampler(LoraModel(...), tokenizer, cache_config)`` samples the
    adapted model.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``, or ``lora`` is not an adapter tree.
      ValueError: an adapter path is not one of the base's Params or its shape differs (a lora made for
        another module); the base already holds ``nnx.LoRAParam`` variables; a bad strategy, or ``rngs`` with
        ``strategy=None`` (which applies no LoRA dropout).
      AttributeError: the base has no method ``method``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
      >>> lora = lora_jax.nnx.init_lora(jax.random.key(1), base, lora_jax.LoraSpec(rank=2))
      >>> model = lora_jax.nnx.LoraModel(base, lora)
      >>> optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
      >>> grads = nnx.grad(lambda m: m(jnp.ones((2, 4))).sum(), argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
      >>> _ = optimizer.update(model, grads)
      >>> float(jnp.abs(model.lora["kernel"].b).sum()) > 0  # B trained (it starts at zero)
      True
      >>> bool((model.base.kernel[...] == base.kernel[...]).all())  # the base is untouched
      True
    """

    def __init__(
        self,
        module: nnx.Module,
        lora: Any,
        *,
        strategy: str | None = "factored",
        method: str = "__call__",
        rngs: nnx.Rngs | None = None,
    ) -> None:
        where = "lora_jax.nnx.LoraModel"
        check_module(where, module)
        check_method(where, module, method)
        check_strategy(where, strategy)
        _check_rngs(where, rngs, strategy)
        _refuse_lora_params(where, module)
        _, params, rest = split_params(module)
        check_fits(where, module, params, rest, lora)
        trainable, frozen = split(lora)
        t_names, self._trainable_def, t_leaves = _names(trainable)
        f_names, self._frozen_def, f_leaves = _names(frozen)
        self._trainable_names, self._frozen_names = t_names, f_names
        self.base = module
        self.trainable = _nest(t_names, [nnx.LoRAParam(x) for x in t_leaves])
        self.frozen = _nest(f_names, [LoraFrozen(x) for x in f_leaves])
        self.strategy, self.method = strategy, method
        self.rngs, self.deterministic = rngs, False

    def __getattr__(self, name: str) -> Any:
        base = vars(self).get("base")
        if name in FORWARDED and base is not None:
            return getattr(base, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def lora(self) -> dict[str, Any]:
        """The current adapter tree (trainable and frozen arrays joined), a lora_jax tree like ``init_lora``'s."""
        trainable = jax.tree_util.tree_unflatten(self._trainable_def, _read(self.trainable, self._trainable_names))
        frozen = jax.tree_util.tree_unflatten(self._frozen_def, _read(self.frozen, self._frozen_names))
        return combine(trainable, frozen)

    def __call__(self, *args: Any, dropout_rng: jax.Array | None = None, **kwargs: Any) -> Any:
        """The base's method with the adapters; ``dropout_rng`` (LoRA dropout) only with a strategy."""
        if dropout_rng is None and self.rngs is not None and not self.deterministic:
            dropout_rng = self.rngs.dropout()
        deterministic = self.deterministic and self.strategy is not None  # model.eval(): no LoRA dropout
        graphdef, params, rest = split_params(self.base)
        out, new_rest = run_method(graphdef, self.method, self.strategy, deterministic)(
            params, self.lora, rest, *args, dropout_rng=dropout_rng, **kwargs
        )
        nnx.update(self.base, new_rest)
        return out
