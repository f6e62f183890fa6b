"""lora_jax: LoRA as a pure transform over JAX parameter pytrees.

>>> import jax, jax.numpy as jnp, lora_jax
>>> params = {"dense": {"kernel": jnp.ones((8, 4)), "bias": jnp.zeros(4)}}
>>> spec = lora_jax.LoraSpec(rank=2, alpha=4.0, targets=["dense"])
>>> lora = lora_jax.init_lora(jax.random.key(0), params, spec)
>>> effective = lora_jax.apply_lora(params, lora)
"""

from lora_jax.adapters._adalora import AdaLoraWeights as AdaLoraWeights
from lora_jax.adapters._dora import DoraWeights as DoraWeights
from lora_jax.adapters._init import init_lora as init_lora
from lora_jax.adapters._init_base import init_lora_and_base as init_lora_and_base
from lora_jax.adapters._lowered import LowRank as LowRank
from lora_jax.adapters._lowered import Replace as Replace
from lora_jax.adapters._nodes import LoraWeights as LoraWeights
from lora_jax.adapters._nodes import Trainable as Trainable
from lora_jax.adapters._registry import SHARED as SHARED
from lora_jax.adapters._registry import is_adapter as is_adapter
from lora_jax.adapters._registry import register_adapter as register_adapter
from lora_jax.adapters._split import combine as combine
from lora_jax.adapters._split import split as split
from lora_jax.adapters._tree import adapter_items as adapter_items
from lora_jax.adapters._vera import VeraWeights as VeraWeights
from lora_jax.factored._interpreter import Factored as Factored
from lora_jax.factored._interpreter import factored as factored
from lora_jax.factored._lazy import FactoredError as FactoredError
from lora_jax.io._fused_mapping import fused_key_mapping as fused_key_mapping
from lora_jax.io._orbax import adapter_checkpoint_args as adapter_checkpoint_args
from lora_jax.io._orbax import save_adapter as save_adapter
from lora_jax.io._orbax_load import load_adapter as load_adapter
from lora_jax.io._orbax_load import read_adapter_meta as read_adapter_meta
from lora_jax.io._peft_adalora import AdaLoraAllocation as AdaLoraAllocation
from lora_jax.io._peft_adalora import import_adalora_allocation as import_adalora_allocation
from lora_jax.io._peft_export import export_peft as export_peft
from lora_jax.io._peft_import import import_peft as import_peft
from lora_jax.io._peft_names import default_name_map as default_name_map
from lora_jax.io._qwix import from_qwix as from_qwix
from lora_jax.io._qwix import to_qwix as to_qwix
from lora_jax.multi._bank import AdapterBank as AdapterBank
from lora_jax.multi._bank import select as select
from lora_jax.multi._bank import stack as stack
from lora_jax.multi._combine import combine_adapters as combine_adapters
from lora_jax.multi._mixed import mixed_batch as mixed_batch
from lora_jax.multi._sharding import bank_shardings as bank_shardings
from lora_jax.parallel._init import init_lora_sharded as init_lora_sharded
from lora_jax.parallel._optimizer import optimizer_shardings as optimizer_shardings
from lora_jax.parallel._sharding import adapter_partition_specs as adapter_partition_specs
from lora_jax.parallel._sharding import adapter_shardings as adapter_shardings
from lora_jax.quant._node import QuantizedKernel as QuantizedKernel
from lora_jax.quant._sharding import quantized_shardings as quantized_shardings
from lora_jax.quant._tree import dequantize as dequantize
from lora_jax.quant._tree import quantize as quantize
from lora_jax.spec._json import spec_from_json as spec_from_json
from lora_jax.spec._json import spec_to_json as spec_to_json
from lora_jax.spec._spec import LoraSpec as LoraSpec
from lora_jax.targets._infer import infer_axes as infer_axes
from lora_jax.targets._select import partition as partition
from lora_jax.transforms._adalora_allocator import AdaLoraState as AdaLoraState
from lora_jax.transforms._adalora_allocator import adalora_allocator as adalora_allocator
from lora_jax.transforms._adalora_allocator import kept_ranks as kept_ranks
from lora_jax.transforms._adalora_allocator import orthogonal_regularizer as orthogonal_regularizer
from lora_jax.transforms._apply import apply_lora as apply_lora
from lora_jax.transforms._apply import dora_norms as dora_norms
from lora_jax.transforms._apply import merge as merge
from lora_jax.transforms._apply import unmerge as unmerge
from lora_jax.transforms._delta_lora import delta_lora_update as delta_lora_update
from lora_jax.transforms._diagnose import diagnose as diagnose
from lora_jax.transforms._diagnose import subspace_similarity as subspace_similarity
from lora_jax.transforms._diagnose_report import diagnosis_table as diagnosis_table
from lora_jax.transforms._diagnose_report import plot_diagnosis as plot_diagnosis
from lora_jax.transforms._loraplus import loraplus as loraplus
from lora_jax.transforms._optim import only_adapters as only_adapters
from lora_jax.transforms._summary import Summary as Summary
from lora_jax.transforms._summary import summary as summary

__version__ = "0.1.0"
