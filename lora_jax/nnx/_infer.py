"""``infer_axes`` for an NNX module: every kernel's layout, read from how the module's method uses it."""

from __future__ import annotations

from typing import Any

from flax import nnx

from lora_jax.nnx._run import check_method, run_method
from lora_jax.nnx._state import check_module, split_params
from lora_jax.targets._infer import infer_axes as _infer_axes


def infer_axes(module: nnx.Module, *args: Any, method: str = "__call__", **kwargs: Any) -> dict[str, str]:
    """Kernel layouts of ``module``'s Params, read from one abstract call ``module.method(*args, **kwargs)``.

    :func:`lora_jax.infer_axes` on the module's functional form: nothing is computed (arguments may be
    ``jax.ShapeDtypeStruct``), the module is not modified. The result keys are the module's ``nnx.State`` paths,
    ready for ``LoraSpec(axes=...)``: a multi-axis attention kernel ``(embed, heads, head_dim)`` is ``"ioo"``, an
    output projection ``(heads, head_dim, embed)`` ``"iio"``.

    Args:
      module: an ``nnx.Module`` (real or from ``nnx.eval_shape``).
      *args: example positional arguments of ``method``.
      method: the name of the method to trace.
      **kwargs: example keyword arguments of ``method``.

    Returns:
      ``{path: layout}`` for every kernel the call uses.

    Raises:
      TypeError: ``module`` is not an ``nnx.Module``.
      AttributeError: ``module`` has no method ``method``.
      ValueError: as :func:`lora_jax.infer_axes` (a kernel whose use cannot be read, or used two ways).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import lora_jax, lora_jax.nnx
      >>> model = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), rngs=nnx.Rngs(0))
      >>> lora_jax.nnx.infer_axes(model, jnp.ones((1, 4, 6)))
      {'kernel': 'ioo'}
    """
    where = "lora_jax.nnx.infer_axes"
    check_module(where, module)
    check_method(where, module, method)
    graphdef, params, rest = split_params(module)
    run = run_method(graphdef, method, None)
    return _infer_axes(lambda p, *a, **k: run(p, {}, rest, *a, **k)[0], params, *args, **kwargs)
