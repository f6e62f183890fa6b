"""Quantized base kernels under ``factored``: dequantized at each point of use, the codes the only residual.

Each :class:`lora_jax.QuantizedKernel` enters the interpreter as a
:class:`DeferredBase`: the node (codes and scales) plus the layout operations
the model applied to the kernel (reshape, transpose, broadcast, slice; a cast
is the lazy kernel's own ``cast``), recorded rather than run. It is a pytree
(the node's arrays and the operations' dynamic operands are its leaves), so it
passes through ``jit`` and ``remat`` bodies as it is, alone (an untargeted
quantized leaf) or as the ``w`` of a :class:`~lora_jax.factored._lazy.LazyKernel`.

At a ``dot_general`` or ``conv_general_dilated`` use, :func:`quantized_use`
computes the base product ``x·W`` inside a :func:`jax.custom_vjp`:

* forward: dequantize (float32, cast once to the kernel's dtype, then to the
  dtype the model computes it in), apply the recorded operations, multiply,
  drop the kernel; the saved residual is the node's codes and scales;
* backward: dequantize again, ``dx = g·Wᵀ`` (the transpose of the product in
  ``x``, which is linear: ``x`` is not saved either); no cotangent for codes
  or scales (the base is frozen).

The dequantization is made to depend on the use's input (forward) and on its
cotangent (backward) through an exact zero added to the code table and the scales, so
XLA dequantizes each kernel where it is used and cannot hoist every layer's
dequantized kernel to the start of the step, nor merge the backward's with the
forward's: one layer's dequantized kernel is alive at a time.

Uses with no product (an embedding ``gather``, DoRA's norm, a kernel formed
with ``materialize=``, an untargeted quantized kernel at a primitive with no
rule) dequantize without a residual (:func:`dequantized`); a quantized kernel
entering ``scan``, ``cond`` or ``while`` is dequantized there, at the loop's
entry (flax ``nn.scan`` stacks: the second-level statistics of double
quantization run across layers, so a step's slice of the codes alone cannot
be dequantized; under ``scan`` the autodiff may keep the stacked dequantized
kernel).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp

from lora_jax.quant._node import QuantizedKernel


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _dequantized(node: QuantizedKernel, dtype: Any) -> jax.Array:
    return node.dequantize(dtype)


def _fwd(node: QuantizedKernel, dtype: Any) -> tuple[jax.Array, None]:
    return node.dequantize(dtype), None


def _bwd(dtype: Any, _: None, g: jax.Array) -> tuple[None]:
    del dtype, g
    return (None,)  # the base is frozen: no cotangent for codes or scales


_dequantized.defvjp(_fwd, _bwd)


@dataclasses.dataclass(frozen=True)
class _Op:
    """One recorded layout operation: the primitive, its parameters, how many dynamic operands it takes."""

    prim: Any
    params: tuple[tuple[str, Any], ...]
    n_operands: int


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeferredBase:
    """A quantized base kernel and the layout operations applied to it, none of them run yet."""

    node: QuantizedKernel
    operands: tuple[Any, ...] = ()  # the dynamic operands of ``ops``, in order (dynamic_slice's starts)
    ops: tuple[_Op, ...] = dataclasses.field(default=(), metadata={"static": True})
    shape: tuple[int, ...] = dataclasses.field(default=(), metadata={"static": True})
    cast: Any = dataclasses.field(default=None, metadata={"static": True})  # an untargeted kernel's float cast

    @property
    def dtype(self) -> Any:
        """The kernel's dtype: its stored (logical) one, or the cast the model applied (the ops are layout only)."""
        return self.node.dtype if self.cast is None else jnp.dtype(self.cast)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def then(self, prim: Any, rest: list[Any], params: dict[str, Any]) -> DeferredBase:
        """This kernel with ``prim(kernel, *rest, **params)`` recorded."""
        spec = jax.ShapeDtypeStruct(self.shape, self.dtype)
        out = jax.eval_shape(lambda w, *r: prim.bind(w, *r, **params), spec, *rest)
        op = _Op(prim, tuple(params.items()), len(rest))
        return dataclasses.replace(self, operands=(*self.operands, *rest), ops=(*self.ops, op), shape=tuple(out.shape))

    def form(self, dtype: Any = None, *, residual_free: bool = False, zero: jax.Array | None = None) -> jax.Array:
        """The kernel with the ops applied: dequantized in float32 and cast once to ``dtype``; by default to its
        stored dtype, then to its ``cast`` (exactly the dequantized kernel the model would have cast).
        ``zero``: see :meth:`lora_jax.QuantizedKernel.dequantize_view`."""
        into = self.node.dtype if dtype is None else jnp.dtype(dtype)
        v = _dequantized(self.node, into) if residual_free else self.node.dequantize(into, zero=zero)
        operands = list(self.operands)
        for op in self.ops:
            rest, operands = operands[: op.n_operands], operands[op.n_operands :]
            v = op.prim.bind(v, *rest, **dict(op.params))
        return v if dtype is not None or self.cast is None else v.astype(self.cast)


def deferred(node: QuantizedKernel) -> DeferredBase:
    """The deferred base of a quantized kernel, with no operation recorded yet."""
    return DeferredBase(node, shape=tuple(node.shape))


def dequantized(w: Any, dtype: Any = None) -> jax.Array:
    """``w`` as a float array in ``dtype`` (default its own): a deferred base dequantized with no residual."""
    if isinstance(w, DeferredBase):
        return w.form(dtype, residual_free=True)
    return w if dtype is None else w.astype(dtype)


def _exact_zero(dep: jax.Array) -> jax.Array:
    """A float32 zero computed from ``dep`` (``dep[0]·0``, or ``0`` where that is not finite)."""
    first = dep.reshape(-1)[0]
    return jnp.where(jnp.isfinite(first), first * 0, jnp.zeros((), first.dtype)).astype(jnp.float32)


def quantized_use(
    prim: Any, params: dict[str, Any], x: jax.Array, base: DeferredBase, dtype: Any, kernel_first: bool
) -> jax.Array:
    """``prim(x, W)`` with ``W = base`` dequantized into ``dtype`` here, saving only codes and scales for the backward.

    Example:
      >>> import jax, jax.numpy as jnp, lora_jax
      >>> w = jax.random.normal(jax.random.key(0), (64, 32))
      >>> q = lora_jax.quantize({"d": {"kernel": w}})["d"]["kernel"]
      >>> x = jnp.ones((4, 64))
      >>> dn = (((1,), (0,)), ((), ()))
      >>> prim, params = jax.lax.dot_general_p, {"dimension_numbers": dn, "precision": None,
      ...                                       "preferred_element_type": jnp.float32, "out_sharding": None}
      >>> y = quantized_use(prim, params, x, deferred(q), jnp.float32, False)
      >>> bool(jnp.allclose(y, x @ q.dequantize(), atol=1e-5))
      True
    """
    leaves, treedef = jax.tree_util.tree_flatten(base)
    x_spec = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def bind(x_: jax.Array, k: jax.Array) -> jax.Array:
        return prim.bind(*((k, x_) if kernel_first else (x_, k)), **params)

    def kernel(leaves_: list[Any], dep: jax.Array) -> jax.Array:
        return jax.tree_util.tree_unflatten(treedef, leaves_).form(zero=_exact_zero(dep)).astype(dtype)

    @jax.custom_vjp
    def use(x_: jax.Array, leaves_: list[Any]) -> jax.Array:
        return bind(x_, kernel(leaves_, x_))

    def fwd(x_: jax.Array, leaves_: list[Any]) -> tuple[jax.Array, list[Any]]:
        return bind(x_, kernel(leaves_, x_)), leaves_  # the residual: codes and scales, never the kernel

    def bwd(leaves_: list[Any], g: jax.Array) -> tuple[jax.Array, None]:
        k = kernel(leaves_, g)
        (dx,) = jax.linear_transpose(lambda xx: bind(xx, k), x_spec)(g)
        return dx, None  # the base is frozen: no cotangent for codes or scales

    use.defvjp(fwd, bwd)
    return use(x, leaves)
