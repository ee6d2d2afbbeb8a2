"""Tuner layer names when several adapter types wrap the same projection (``PeftMixedModel``, or LoRA on an ALPS
model): the inner wrapper then sits at ``<name>.base_layer``, and saved adapters and exports name it as a model with
only that adapter type would (``<name>``)."""

from __future__ import annotations

from torch import nn


def canonical_module_names(model: nn.Module) -> dict[str, str]:
    """Tuner layer name -> the name it would have with only its own adapter type on the model.

    When two adapter types wrap the same projection, the inner wrapper sits at ``<name>.base_layer``; a model with
    only that adapter type has it at ``<name>``.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuner_names = {name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)}
    canonical = {}
    for name in sorted(tuner_names, key=len):
        parent, _, last = name.rpartition(".")
        if last == "base_layer" and parent in tuner_names:
            canonical[name] = canonical[parent]
        else:
            canonical[name] = name
    return canonical


def canonical_key(key: str, canonical: dict[str, str]) -> str:
    """``key`` (a state-dict key) with its module part renamed by ``canonical``."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if module in canonical:
            return ".".join([canonical[module], *parts[cut:]])
    return key
