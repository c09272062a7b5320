"""lora-lite: LoRA-family adapters as YAML specs compiled to readable hook modules.

import lora_lite as ll
cfg = ll.from_spec("lora", r=8)          # or ll.LoRAConfig(r=8, alpha=16)
ll.attach(model, cfg)                    # forward hooks; base frozen
ll.save(model, "adapter.safetensors")
ll.detach(model)                         # base model back, bit for bit (within rounding)
ll.load(model, "adapter.safetensors")
ll.export_peft(model, "adapter_dir")     # PEFT / vLLM format; ll.load_peft reads one
ll.merge(model)                          # fold into the weights: a plain model
with ll.disabled(model): ...             # the base model's outputs, nothing detached
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load, read_metadata, save  # noqa: E402
from .codegen import SpecError  # noqa: E402
from .config import AdapterConfig  # noqa: E402
from .merge import merge  # noqa: E402
from .peft_io import export_peft, load_peft  # noqa: E402
from .registry import from_spec, shipped_names, variant_module  # noqa: E402
from .runtime import (  # noqa: E402
    AttachError,
    attach,
    detach,
    set_active,
    set_coeff,
    state,
    states,
    trainable_parameters,
)
from .scaling import disabled, scale  # noqa: E402
from .variant import Variant  # noqa: E402

# Typed configs, as in upstream's Quickstart: ll.LoRAConfig(r=8, alpha=16, dtype=torch.bfloat16)
CONFIG_NAMES = {
    "LoRAConfig": "lora",
    "PiSSAConfig": "pissa",
    "DoRAConfig": "dora",
    "DeLoRAConfig": "delora",
    "IA3Config": "ia3",
    "IA3FFConfig": "ia3_ff",
    "HRAConfig": "hra",
    "EVAConfig": "eva",
    "AntiPaSTOConfig": "antipasto",
    "AntiPaSTOCorDAConfig": "antipasto_corda",
    "AntiPaSTOAblateConfig": "antipasto_ablate",
    "AntiPaSTOArrowConfig": "antipasto_arrow",
    "CorDAArrowConfig": "corda_arrow",
    "OLoRAConfig": "olora",
    "RsLoRAConfig": "rslora",
    "PiSSADoRAConfig": "pissa_dora",
    "LoRAFAConfig": "lora_fa",
    "MiLoRAConfig": "milora",
    "LoRAXSConfig": "lora_xs",
    "AntiPaSTODoRAConfig": "antipasto_dora",
    "RoadConfig": "road",
    "HRADoRAConfig": "hra_dora",
    "EVADoRAConfig": "eva_dora",
    "LoHaConfig": "loha",
    "LoKrConfig": "lokr",
    "OFTConfig": "oft",
    "BOFTConfig": "boft",
    "CorDAConfig": "corda_lora",
    "CorDADoRAConfig": "corda_dora",
    "VeRAConfig": "vera",
}


def __getattr__(name):
    if name in CONFIG_NAMES:
        return variant_module(CONFIG_NAMES[name]).Config
    if name == "AdapterTrainer":  # imports transformers, so only on first use
        from .hf import AdapterTrainer

        return AdapterTrainer
    raise AttributeError(f"module 'lora_lite' has no attribute {name!r}")


def __dir__():
    """The module's names plus the lazy ones (the typed configs, AdapterTrainer), for dir() and completion."""
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "AdapterConfig",
    "AdapterTrainer",
    "AttachError",
    "CheckpointError",
    "SpecError",
    "Variant",
    "attach",
    "detach",
    "disabled",
    "export_peft",
    "from_spec",
    "load",
    "load_peft",
    "merge",
    "read_metadata",
    "save",
    "scale",
    "set_active",
    "set_coeff",
    "shipped_names",
    "state",
    "states",
    "trainable_parameters",
    "variant_module",
    *CONFIG_NAMES,
]
