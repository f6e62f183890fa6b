"""Choosing targets: which leaves get an adapter, which are trained in full.

Matching rules (documented on :class:`lora_jax.LoraSpec`):

* a regex string full-matches a leaf's path or its module path (the path
  without the leaf's own key);
* a list of names matches when a name equals a key on the path, or a run of
  keys joined by "/" (``"attention/query"``);
* a callable gets ``(path, leaf)`` and returns a bool;
* pattern dicts (``rank_pattern``, ``alpha_pattern``, ``axes``) use both the
  regex and the name rule; a key equal to a leaf's full path wins for that
  leaf (so the literal paths of :func:`lora_jax.infer_axes` match themselves
  even when they hold regex characters), else the first matching key wins.

With ``LoraSpec(target_match="peft")`` the selectors and the rank/alpha
patterns follow PEFT's rules instead (``peft.tuners.tuners_utils.
check_target_module_exists``, ``peft.utils.other.get_pattern_key``), on the
module name: the path without its leaf key, "/" read as "." (see
:func:`module_name_of`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_jax.errors._checks import check_params, check_spec
from lora_jax.errors._messages import describe, expected
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets import _layout
from lora_jax.targets._paths import flatten_with_paths, map_with_paths

LORA, FROZEN, TRAINABLE = "lora", "frozen", "trainable"

_EMBED_KEY = re.compile(r"(?i)(embedding|embeddings|.*embed.*|wte|wpe)")
_NOT_KERNEL = frozenset({"bias", "scale"})  # multi-axis biases (DenseGeneral) and norm scales
_HEAD_KEY = re.compile(r"(?i)(head|.*_head|classifier|score|logits|output_projection|unembed)")


@dataclasses.dataclass(frozen=True)
class Target:
    """How one kernel is adapted."""

    path: str
    shape: tuple[int, ...]
    dtype: Any
    layout: str
    rank: int
    alpha: float
    scale: float
    kind: str  # "linear" or "embed"


def _keys(path: str) -> list[str]:
    return path.split("/")


def _key_runs(keys: list[str]) -> set[str]:
    return {"/".join(keys[i:j]) for i in range(len(keys)) for j in range(i + 1, len(keys) + 1)}


def _regex_match(pattern: str, path: str) -> bool:
    module = path.rpartition("/")[0]
    try:
        return bool(re.fullmatch(pattern, path) or (module and re.fullmatch(pattern, module)))
    except re.error as e:
        raise ValueError(f"pattern {pattern!r} is not a valid regular expression: {e}.") from e


def module_name_of(path: str) -> str:
    """The module name PEFT's matching sees for a leaf: the path without its leaf key, "/" read as ".".

    It is the name :func:`lora_jax.default_name_map` exports the module under.

    >>> module_name_of("layers_0/attn/query/kernel")
    'layers_0.attn.query'
    """
    return path.rpartition("/")[0].replace("/", ".")


def peft_selector_matches(selector: Any, path: str, leaf: Any, *, saved: bool = False) -> bool:
    """PEFT's rule: a list entry equals the module name or is a ``"."``-suffix of it; a string full-matches it.

    ``saved=True`` is ``modules_to_save``'s rule: an entry matches a module
    name holding it as a run of whole "."-separated parts (the module and
    everything under it).

    >>> peft_selector_matches(["query"], "layers_0/attn/query/kernel", None)
    True
    >>> peft_selector_matches(["attn"], "layers_0/attn/query/kernel", None)
    False
    >>> peft_selector_matches(["head"], "head/dense/kernel", None, saved=True)
    True
    """
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(path, leaf))
    module = module_name_of(path)
    if not module:
        return False
    if isinstance(selector, str):
        return bool(re.fullmatch(selector, module))
    if saved:
        return any(re.match(rf"(^|.*\.){name}($|\..*)", module) for name in selector)
    return any(module == name or module.endswith(f".{name}") for name in selector)


def _peft_pattern_matches(pattern: str, path: str) -> bool:
    """PEFT's ``get_pattern_key``: the module name ends in the pattern, after a "." or from the start."""
    module = module_name_of(path)
    return bool(module and re.match(rf"(.*\.)?({pattern})$", module))


def pattern_matches(pattern: str, path: str, match: str = "lora_jax") -> bool:
    """Whether a pattern-dict key matches ``path`` (regex or key-name rule; PEFT's with ``match="peft"``)."""
    if match == "peft":
        return _peft_pattern_matches(pattern, path)
    return pattern in _key_runs(_keys(path)) or _regex_match(pattern, path)


def selector_matches(selector: Any, path: str, leaf: Any, match: str = "lora_jax", *, saved: bool = False) -> bool:
    """Whether a targets/exclude/trainable selector picks the leaf at ``path``.

    ``match="peft"`` uses :func:`peft_selector_matches` (``saved`` for ``trainable``).
    """
    if match == "peft":
        return peft_selector_matches(selector, path, leaf, saved=saved)
    if selector is None:
        return False
    if callable(selector):
        return bool(selector(path, leaf))
    if isinstance(selector, str):
        return _regex_match(selector, path)
    runs = _key_runs(_keys(path))
    return any(name in runs or _regex_match(name, path) for name in selector)


def _is_explicit(selector: Any, path: str, leaf: Any, match: str = "lora_jax") -> bool:
    """Whether the selector names the leaf itself rather than its module (PEFT's names modules only)."""
    if callable(selector):
        return bool(selector(path, leaf))
    if match == "peft":
        return False
    if isinstance(selector, str):
        return bool(re.fullmatch(selector, path))
    return _keys(path)[-1] in selector


def _shape_dtype(leaf: Any) -> tuple[tuple[int, ...], Any] | None:
    if isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) or (
        hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    ):
        dtype = leaf.dtype
        if not jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG key arrays (nnx.Rngs) keep their dtype
            dtype = jnp.dtype(dtype)
        return tuple(leaf.shape), dtype
    return None


def is_embedding(path: str) -> bool:
    """Heuristic: an embedding table (flax ``Embed`` names its leaf ``embedding``)."""
    keys = _keys(path)
    if keys[-1] == "kernel":  # a Dense/Conv kernel is never a table, even in a module named "patch_embed"
        return False
    return any(_EMBED_KEY.fullmatch(k) for k in keys)  # the leaf's own key too: {"tok_embeddings": table}


def is_output_head(path: str) -> bool:
    """Heuristic: an output head (``lm_head``, ``head``, ``classifier``, ...)."""
    return any(_HEAD_KEY.fullmatch(k) for k in _keys(path)[:-1])


def _first(patterns: tuple, path: str, default: Any, match: str = "lora_jax") -> Any:
    if match == "peft":  # PEFT: the first key in order that the module name ends in
        return next((value for key, value in patterns if _peft_pattern_matches(key, path)), default)
    for key, value in patterns:
        if key == path:
            return value
    for key, value in patterns:
        if pattern_matches(key, path):
            return value
    return default


def _layout_for(path: str, shape: tuple[int, ...], spec: LoraSpec) -> str | None:
    """The kernel's layout from ``spec.axes`` (2-D kernels default to Dense's ``"io"``); None if ambiguous."""
    layout = _first(spec.axes, path, None)
    if layout is None:
        return "io" if len(shape) == 2 else None
    _layout.check_layout(layout, shape, path)
    return layout


def _ambiguous_error(kernels: list[tuple[str, tuple[int, ...]]]) -> ValueError:
    """One error that lists every kernel whose layout is ambiguous, and the call that infers them."""
    lines = "\n".join(
        f"  {path}: kernel of shape {shape} has {len(shape)} axes, so which are input, output or stacked-layer "
        f"axes is ambiguous." for path, shape in kernels
    )  # fmt: skip
    return ValueError(
        f"{len(kernels)} kernel(s) need a layout in LoraSpec(axes={{pattern: layout}}), one letter per axis: "
        f"'i' input (contracted with the activations), 'o' output, 'b' stacked layer (nn.scan).\n{lines}\n"
        f"Infer them from how the model uses each kernel: "
        f"LoraSpec(axes=lora_jax.infer_axes(fn, params, *example_args)), where fn(params, *example_args) runs "
        f"the model. Layouts differ per kernel: a (d_model, heads, head_dim) query projection is 'ioo', a "
        f"(heads, head_dim, d_model) output projection 'iio', a Conv2D (kh, kw, in, out) 'iiio', an "
        f"nn.scan-stacked Dense (layers, in, out) 'bio'."
    )


def _shown(selector: Any) -> str:
    """A selector as the user wrote it: a list for a list of names (the spec stores a tuple)."""
    return (
        repr(list(selector)) if isinstance(selector, tuple) else "<callable>" if callable(selector) else repr(selector)
    )


def _is_kernel_like(leaf: Any) -> bool:
    sd = _shape_dtype(leaf)
    return sd is not None and len(sd[0]) >= 2 and jnp.issubdtype(sd[1], jnp.floating)


def _no_match_error(spec: LoraSpec, flat: dict[str, Any], excluded: list[str]) -> ValueError:
    paths = list(flat)
    if excluded:
        return ValueError(
            expected(
                f"LoraSpec(exclude={_shown(spec.exclude)})",
                f"to leave some of the kernels that targets={_shown(spec.targets)} selects",
                f"it removed every one ({', '.join(excluded[:5])}{', ...' if len(excluded) > 5 else ''})",
                "Narrow exclude, or choose other targets",
                found_is_text=True,
            )
        )
    if not any(_is_kernel_like(leaf) for leaf in flat.values()):
        shown = ", ".join(f"{p}: {describe(x)}" for p, x in list(flat.items())[:5])
        return ValueError(
            expected(
                f"LoraSpec(targets={_shown(spec.targets)}) matched no kernel",
                "params holding floating-point arrays with 2 or more axes",
                f"none among {len(paths)} leaves ({shown})",
                "Pass the model's parameter tree, e.g. variables['params']",
                found_is_text=True,
            )
        )
    if spec.target_match == "peft":
        modules = sorted({module_name_of(p) for p, leaf in flat.items() if _is_kernel_like(leaf)} - {""})
        wanted = [spec.targets] if isinstance(spec.targets, str) else [] if callable(spec.targets) else spec.targets
        near = list(dict.fromkeys(m for w in wanted for m in difflib.get_close_matches(w, modules, n=4, cutoff=0.0)))
        return ValueError(
            expected(
                f"LoraSpec(targets={_shown(spec.targets)}, target_match='peft')",
                "module names to match kernels by PEFT's rule (a list entry equals a module name or its last "
                "'.'-separated parts; a string full-matches the module name)",
                f"no match among {len(modules)} kernel modules (nearest: {', '.join(near[:8] or modules[:8])})",
                "A module name is the parameter path without its leaf key, '/' read as '.': 'layers_0/attn/query/kernel' "
                "is module 'layers_0.attn.query', matched by 'query' or 'attn.query'",
                found_is_text=True,
            )
        )
    candidates = sorted(set(paths) | {p.rpartition("/")[0] for p in paths} - {""})
    wanted = (
        [spec.targets] if isinstance(spec.targets, str) else list(spec.targets) if not callable(spec.targets) else []
    )
    near: list[str] = []
    for w in wanted:
        near += difflib.get_close_matches(w, candidates, n=5, cutoff=0.0)
        near += difflib.get_close_matches(w, sorted({k for p in paths for k in _keys(p)}), n=3, cutoff=0.5)
    near = list(dict.fromkeys(near))[:8] or candidates[:8]
    return ValueError(
        f"LoraSpec(targets={_shown(spec.targets)}) matched no kernel among {len(paths)} parameters. "
        f"Nearest paths: {', '.join(near)}. A regex must full-match a leaf or module path; a list "
        f"entry must equal a key on the path (e.g. targets=['query', 'value'])."
    )


def _check_pattern_keys(spec: LoraSpec, adapted: list[str], all_paths: list[str]) -> None:
    """Every key of rank_pattern / alpha_pattern matches an adapted kernel, every key of axes a parameter."""

    def matches(key: str, path: str, name: str) -> bool:
        if name != "axes" and spec.target_match == "peft":
            return pattern_matches(key, path, "peft")
        return key == path or pattern_matches(key, path)

    for name, among, what in (
        ("rank_pattern", adapted, "an adapted kernel"),
        ("alpha_pattern", adapted, "an adapted kernel"),
        ("axes", all_paths, "a parameter path"),
    ):
        for key, _ in getattr(spec, name):
            if not any(matches(key, p, name) for p in among):
                near = difflib.get_close_matches(key, among, n=3, cutoff=0.0)
                raise ValueError(
                    expected(
                        f"LoraSpec({name}=...)",
                        f"every key to match {what}",
                        f"the key {key!r}, which matches none",
                        f"Nearest: {', '.join(near)}. A key is a regex or key name, written like targets "
                        f"(a typo here would silently keep the default)",
                        found_is_text=True,
                    )
                )


def resolve(params: Any, spec: LoraSpec) -> tuple[dict[str, Target], set[str]]:
    """Resolve ``spec`` against ``params``.

    Returns:
      ``(targets, trainable)``: the kernels that get an adapter, keyed by path,
      and the set of paths trained in full.

    Raises:
      ValueError: on targets that match nothing, ambiguous layouts (all listed
        in one error, with the :func:`lora_jax.infer_axes` call that reads
        them), too-large ranks; TypeError: on integer or non-array leaves that are targeted.
    """
    flat = flatten_with_paths(params)
    targets: dict[str, Target] = {}
    trainable: set[str] = set()
    ambiguous: list[tuple[str, tuple[int, ...]]] = []
    too_large: list[tuple[str, ValueError]] = []
    excluded: list[str] = []  # kernels that targets selects and exclude removes
    all_linear = spec.targets == "all-linear"
    match = spec.target_match
    for path, leaf in flat.items():
        # PEFT's exclude_modules keeps adapters off a module; its modules_to_save are trained whatever exclude says
        saved = match == "peft" and selector_matches(spec.trainable, path, leaf, match, saved=True)
        if not saved and spec.exclude is not None and selector_matches(spec.exclude, path, leaf, match):
            if _is_kernel_like(leaf) and (
                (all_linear and not is_embedding(path) and not is_output_head(path))
                or (not all_linear and selector_matches(spec.targets, path, leaf, match))
            ):
                excluded.append(path)
            continue
        if selector_matches(spec.trainable, path, leaf, match, saved=True):
            if _shape_dtype(leaf) is None:
                raise TypeError(f"{path}: LoraSpec(trainable=...) selects a {type(leaf).__name__}, not an array.")
            trainable.add(path)
            continue
        sd = _shape_dtype(leaf)
        module_level_skip = _keys(path)[-1] in _NOT_KERNEL
        if all_linear:
            if module_level_skip:
                continue
            if sd is None or len(sd[0]) < 2 or not jnp.issubdtype(sd[1], jnp.floating):
                continue
            if is_embedding(path) or is_output_head(path):
                continue
        elif not selector_matches(spec.targets, path, leaf, match):
            continue
        else:
            explicit = _is_explicit(spec.targets, path, leaf, match)
            if module_level_skip and not explicit:
                continue
            if sd is None:
                if explicit:
                    raise TypeError(
                        f"{path}: LoraSpec(targets=...) selects a {type(leaf).__name__} leaf, but only "
                        f"array kernels can carry an adapter; narrow targets or add it to exclude."
                    )
                continue
            if len(sd[0]) < 2:
                if explicit:
                    raise ValueError(
                        f"{path}: LoraSpec(targets=...) selects a leaf of shape {sd[0]}, but a LoRA kernel "
                        f"needs at least 2 axes (biases and norms are left alone); to train it, use "
                        f"LoraSpec(trainable=...)."
                    )
                continue
            if not jnp.issubdtype(sd[1], jnp.floating):
                raise TypeError(
                    f"{path}: LoraSpec(targets=...) selects a leaf of dtype {sd[1]} and shape {sd[0]}; LoRA adapts "
                    f"floating-point kernels only. Exclude it with LoraSpec(exclude=...)."
                )
        shape, dtype = sd
        layout = _layout_for(path, shape, spec)
        if layout is None:
            ambiguous.append((path, shape))
            continue
        rank = _first(spec.rank_pattern, path, spec.rank, match)
        alpha = _first(spec.alpha_pattern, path, spec.alpha, match)
        limit = _layout.max_rank(layout, shape)
        # raised after the ambiguous layouts; VeRA's r is the shared projections' rank, of any size
        if rank > limit and not spec.vera:
            too_large.append(
                (
                    path,
                    ValueError(
                        f"{path}: rank {rank} is larger than the kernel allows: shape {shape} with layout "
                        f"{layout!r} has fan-in {_layout.fan_in(layout, shape)} and fan-out "
                        f"{_layout.fan_out(layout, shape)}, so rank <= {limit}. Lower LoraSpec(rank=...) or set "
                        f"LoraSpec(rank_pattern={{{path!r}: {limit}}})."
                    ),
                )
            )
            continue
        kind = "embed" if is_embedding(path) and len(shape) == 2 else "linear"
        targets[path] = Target(path, shape, dtype, layout, rank, alpha, spec.scale_for(rank, alpha), kind)
    if ambiguous:
        raise _ambiguous_error(ambiguous)
    adapted = [*targets, *(p for p, _ in too_large)]
    if not adapted:
        raise _no_match_error(spec, flat, excluded)
    _check_pattern_keys(spec, adapted, list(flat))
    if too_large:
        raise too_large[0][1]
    return targets, trainable


def partition(params: Any, spec: LoraSpec) -> Any:
    """Label every leaf of ``params``: ``"lora"``, ``"frozen"`` or ``"trainable"``.

    ``"lora"`` marks a frozen kernel that carries an adapter, ``"frozen"`` the
    rest of the base, ``"trainable"`` leaves trained in full. The result has the
    structure of ``params`` and plugs into ``optax.multi_transform``.

    Args:
      params: a parameter pytree.
      spec: the adapter configuration.

    Returns:
      A pytree of label strings with the structure of ``params``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> params = {"dense": {"kernel": jnp.ones((4, 3)), "bias": jnp.zeros(3)},
      ...           "head": {"kernel": jnp.ones((3, 2))}}
      >>> labels = partition(params, LoraSpec(rank=2, targets=["dense"], trainable=["head"]))
      >>> labels
      {'dense': {'bias': 'frozen', 'kernel': 'lora'}, 'head': {'kernel': 'trainable'}}
      >>> tx = optax.multi_transform(
      ...     {"trainable": optax.adam(1e-3), "lora": optax.set_to_zero(), "frozen": optax.set_to_zero()},
      ...     labels)
    """
    check_params("partition", params, order="partition(params, spec)")
    check_spec("partition", spec, order="partition(params, spec)")
    targets, trainable = resolve(params, spec)
    return map_with_paths(lambda p, _: LORA if p in targets else TRAINABLE if p in trainable else FROZEN, params)
