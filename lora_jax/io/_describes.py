"""Whether a :class:`LoraSpec` describes an adapter tree: checked before a writer stores the spec beside it.

:func:`lora_jax.save_adapter` and :func:`lora_jax.export_peft` write the spec
next to the arrays (``load_adapter`` returns it, PEFT reads ``r``,
``lora_alpha``, ``use_rslora`` from it). A spec that does not describe the
adapter (another rank, alpha, rslora, dropout, freeze_a, or targets that select
other paths) would be stored silently and be wrong on every later use, so the
spec is resolved against the adapter's own kernels (each adapted path with the
kernel shape its node fits) and every built-in node is compared with what the
spec gives it. Registered variants carry their own metadata and are not compared.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from lora_jax.adapters._dora import DoraWeights
from lora_jax.adapters._nodes import LoraWeights, Trainable
from lora_jax.adapters._registry import check_whole
from lora_jax.adapters._tree import adapter_items, items_of
from lora_jax.errors._messages import expected
from lora_jax.spec._spec import LoraSpec
from lora_jax.targets._paths import nest
from lora_jax.targets._select import _first, pattern_matches, resolve

_HINT = "pass the LoraSpec the adapter was made with (init_lora's, or the one load_adapter/import_peft returned)"


def _describe_spec_target(t: Any, spec: LoraSpec) -> str:
    return f"rank {t.rank}, alpha {t.alpha:g}, rslora={spec.rslora} (scale {t.scale:g}), layout {t.layout!r}"


def check_adapter_args(lora: Any, spec: Any, fn: str) -> None:
    """Raise ``TypeError`` when ``lora`` and ``spec`` are swapped, not an adapter tree, or not a spec."""
    if isinstance(lora, LoraSpec):
        raise TypeError(
            expected(
                f"{fn}(lora=...)", "an adapter tree (from init_lora)", lora, f"the order is {fn}(path, lora, spec)"
            )
        )
    if not isinstance(spec, LoraSpec):
        raise TypeError(expected(f"{fn}(spec=...)", "a LoraSpec", spec, "pass the spec the adapter was made with"))
    order = f"{fn}(lora, spec)" if fn == "adapter_checkpoint_args" else f"{fn}(path, lora, spec)"
    if not items_of(lora, fn, order):
        raise ValueError(
            expected(
                f"{fn}(lora=...)",
                "an adapter tree holding at least one adapter node (from init_lora)",
                lora,
                "there is nothing to save; create the adapter with init_lora",
            )
        )


def check_spec_describes(lora: Any, spec: LoraSpec, fn: str) -> None:
    """Raise ``ValueError`` naming the first path where ``spec`` does not give the adapter's node.

    Args:
      lora: the adapter tree about to be written.
      spec: the spec to be written beside it.
      fn: the public function, for the message (``"save_adapter"``).
    """
    where = f"{fn}(spec=...)"
    if not isinstance(spec, LoraSpec):
        raise TypeError(expected(where, "a LoraSpec", spec, "pass the spec the adapter was made with"))
    nodes = adapter_items(lora)
    for p, node in nodes.items():
        check_whole(node, p)  # a part of lora_jax.split is refused first, with its own message
    items = {p: n for p, n in nodes.items() if type(n) in (LoraWeights, DoraWeights, Trainable)}
    if not items:
        return
    abstract = {}
    for p, node in items.items():
        if type(node) in (LoraWeights, DoraWeights):
            abstract[p] = jax.ShapeDtypeStruct(tuple(node.kernel_shape), "float32")
        else:
            abstract[p] = jax.ShapeDtypeStruct(tuple(node.value.shape), node.value.dtype)
    if any(callable(sel) for sel in (spec.targets, spec.exclude, spec.trainable)):
        # a callable selector may test the real leaves (their type, dtype), which are not here: compare what the
        # spec gives each node by its path, without re-running the selection
        _check_by_path(items, spec, where)
        return
    # layouts given for kernels the adapter does not hold (infer_axes gives one for every kernel) are not its business
    axes = tuple((k, v) for k, v in spec.axes if any(k == p or pattern_matches(k, p) for p in abstract))
    try:
        targets, trainable = resolve(nest(abstract), spec.replace(axes=axes))
    except (ValueError, TypeError) as e:
        raise ValueError(
            expected(
                where,
                "the LoraSpec that describes this adapter",
                f"a spec that cannot be resolved against the adapter's own kernels ({' '.join(str(e).split())})",
                _HINT,
                found_is_text=True,
            )
        ) from None
    for p, node in items.items():
        if type(node) is Trainable:
            if p not in trainable:
                found = f"LoRA (rank {targets[p].rank})" if p in targets else "nothing (the base leaf stays frozen)"
                raise ValueError(
                    expected(
                        f"{where} at {p}",
                        "LoraSpec(trainable=...) to select this leaf, which the adapter trains in full",
                        f"a spec that gives it {found}",
                        _HINT,
                        found_is_text=True,
                    )
                )
            continue
        t = targets.get(p)
        if t is None:
            found = "selects it for training in full" if p in trainable else "does not select it (targets/exclude)"
            raise ValueError(
                expected(
                    f"{where} at {p}",
                    f"a spec whose targets select this LoRA kernel (rank {node.rank}, layout {node.layout!r})",
                    f"a spec that {found}",
                    _HINT,
                    found_is_text=True,
                )
            )
        frozen = ("a",) if spec.freeze_a else ()
        checks = [
            ("rank", node.rank, t.rank),
            ("layout", node.layout, t.layout),
            ("scale", node.scale, t.scale),
            ("dropout", node.dropout, spec.dropout),
            ("frozen", tuple(node.frozen), frozen),
            ("dora", type(node) is DoraWeights, spec.dora),
        ]
        for name, have, want in checks:
            same = math.isclose(have, want, rel_tol=1e-9) if name in ("scale", "dropout") else have == want
            if same:
                continue
            field = {
                "rank": "rank/rank_pattern",
                "layout": "axes",
                "scale": "alpha/alpha_pattern/rslora",
                "dropout": "dropout",
                "frozen": "freeze_a",
                "dora": "dora",
            }[name]
            raise ValueError(
                expected(
                    f"{where} at {p}",
                    f"the adapter's {name} {have!r}",
                    f"{want!r} from LoraSpec({field}=...) ({_describe_spec_target(t, spec)}, dropout {spec.dropout:g}, "
                    f"freeze_a={spec.freeze_a})",
                    _HINT,
                    found_is_text=True,
                )
            )


def _check_by_path(items: dict[str, Any], spec: LoraSpec, where: str) -> None:
    """Rank, scale, dropout and frozen of each LoRA node against the spec's patterns for its path."""
    frozen = ("a",) if spec.freeze_a else ()
    for p, node in items.items():
        if type(node) not in (LoraWeights, DoraWeights):
            continue
        rank = _first(spec.rank_pattern, p, spec.rank, spec.target_match)
        alpha = _first(spec.alpha_pattern, p, spec.alpha, spec.target_match)
        checks = [
            ("rank", node.rank, rank, "rank/rank_pattern"),
            ("scale", node.scale, spec.scale_for(rank, alpha), "alpha/alpha_pattern/rslora"),
            ("dropout", node.dropout, spec.dropout, "dropout"),
            ("frozen", tuple(node.frozen), frozen, "freeze_a"),
            ("dora", type(node) is DoraWeights, spec.dora, "dora"),
        ]
        for name, have, want, field in checks:
            same = math.isclose(have, want, rel_tol=1e-9) if name in ("scale", "dropout") else have == want
            if not same:
                raise ValueError(
                    expected(
                        f"{where} at {p}",
                        f"the adapter's {name} {have!r}",
                        f"{want!r} from LoraSpec({field}=...)",
                        _HINT,
                        found_is_text=True,
                    )
                )
