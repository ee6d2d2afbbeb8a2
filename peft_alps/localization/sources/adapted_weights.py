"""The weight a PEFT-wrapped projection really computes with, read without changing the model.

Localization compares attention weights. A task model that is a PEFT model (LoRA, ALPS, LoHa/LoKr, or several in a
``PeftMixedModel``) holds its fine-tune in adapter tensors beside frozen base weights; scoring the frozen weights
would give every head 0. :func:`projection_weight` returns, for one projection at a time, what
``merge_and_unload()`` would leave in it:

* the stored base weight (dequantized by the caller when it is 4/8-bit), which already holds merged adapters;
* plus, when nothing is merged, the delta of every active adapter, from the tuner layer's own ``get_delta_weight``
  (ALPS: its head slices are added with ``index_add``, no full-size delta);
* minus the merged deltas when adapters are disabled (the forward pass unmerges them then).

These are the cases of the tuner layers' own forward pass, so the weight is the one the model computes with.

``frozen=True`` reads the weight with no adapter at all, for the base side of a pair whose task model wraps the very
same modules (``get_peft_model`` injects into the base model in place). Adapter types whose effect is not an
additive weight delta (DoRA and other LoRA variants, IA3, OFT, ...) are refused, naming ``merge_and_unload()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

from peft_alps.tuner.layer import AlpsLayer


def _merge_first(module_name: str, layer: nn.Module, adapter: str, why: str) -> ValueError:
    return ValueError(
        f"cannot read the fine-tuned weight of {module_name!r}: it is wrapped by a {type(layer).__name__} adapter "
        f"({adapter!r}) {why}. Localize a merged copy instead: task = task_model.merge_and_unload() (on a "
        "copy.deepcopy of it if you still need the adapter), or save that and pass its folder."
    )


def _add_delta(weight: torch.Tensor, layer: BaseTunerLayer, adapter: str, sign: int, module_name: str) -> torch.Tensor:
    if isinstance(layer, AlpsLayer):
        delta = layer.alps_delta[adapter].detach().to(weight.device, weight.dtype)
        dim = 0 if layer.axis == "out" else 1
        if layer.transposed:
            delta, dim = delta.T, 1 - dim
        return weight.index_add(dim, layer.alps_index[adapter].to(weight.device), delta, alpha=sign)
    from peft.tuners.lora import LoraLayer
    from peft.tuners.lycoris_utils import LycorisLayer

    if isinstance(layer, LoraLayer):
        if adapter in getattr(layer, "lora_variant", {}) or getattr(layer, "use_dora", {}).get(adapter, False):
            raise _merge_first(module_name, layer, adapter, "that is a LoRA variant (e.g. DoRA), not a plain delta")
        if adapter not in layer.lora_A:
            raise _merge_first(module_name, layer, adapter, "that is not a linear LoRA delta")
    elif not isinstance(layer, LycorisLayer):  # LoHa, LoKr: merged as weight + get_delta_weight
        raise _merge_first(module_name, layer, adapter, "whose effect is not an additive weight delta")
    with torch.no_grad():
        delta = layer.get_delta_weight(adapter)
    if tuple(delta.shape) != tuple(weight.shape):
        raise _merge_first(module_name, layer, adapter, f"whose delta has shape {list(delta.shape)}, not the weight's")
    return weight + sign * delta.detach().to(weight.device, weight.dtype)


def _tuner_layers(module: nn.Module) -> tuple[list[BaseTunerLayer], nn.Module]:
    """The tuner layers wrapped around a projection, outermost first, and the plain layer inside them."""
    chain = []
    while isinstance(module, BaseTunerLayer):
        chain.append(module)
        module = module.base_layer
    return chain, module


def _with_adapters(layer: BaseTunerLayer) -> set[str]:
    return {name for attr in layer.adapter_layer_names for name in getattr(layer, attr, {})}


def projection_weight(
    module: nn.Module, module_name: str, read: Callable[[nn.Module], torch.Tensor], frozen: bool = False
) -> torch.Tensor:
    """Weight of one projection (storage orientation) as the forward pass uses it; ``read(plain_layer)`` gives the
    stored weight of the innermost layer. ``frozen``: without any adapter."""
    module = _modules_to_save_choice(module, frozen)
    chain, plain = _tuner_layers(module)
    weight = read(plain)
    for layer in chain:  # the cases of the tuner layers' forward
        if frozen or layer.disable_adapters:  # the forward unmerges first
            for adapter in layer.merged_adapters:
                weight = _add_delta(weight, layer, adapter, -1, module_name)
        elif not layer.merged:
            for adapter in sorted(set(layer.active_adapters) & _with_adapters(layer)):
                weight = _add_delta(weight, layer, adapter, +1, module_name)
    return weight


def _modules_to_save_choice(module: nn.Module, frozen: bool) -> nn.Module:
    """A projection listed in ``modules_to_save`` is a wrapper: the active adapter's trained copy, or the original."""
    from peft.utils.other import ModulesToSaveWrapper

    if not isinstance(module, ModulesToSaveWrapper):
        return module
    active = module.active_adapters[0] if module.active_adapters else None
    if frozen or module.disable_adapters or active not in module.modules_to_save:
        return module.original_module
    return module.modules_to_save[active]


# ------------------------------------------------------------------------------------------------ model level


def is_peft_wrapper(model: Any) -> bool:
    """A ``PeftModel``, ``PeftMixedModel`` or a tuner (``LoraModel``, ``AlpsModel``, ...)."""
    from peft import PeftMixedModel, PeftModel

    return isinstance(model, (PeftModel, PeftMixedModel, BaseTuner))


def check_localizable(model: Any) -> None:
    """Refuse PEFT models whose fine-tune lives outside the attention weights (prompt learning)."""
    config = getattr(model, "active_peft_config", None) if is_peft_wrapper(model) else None
    if config is not None and getattr(config, "is_prompt_learning", False):
        raise ValueError(
            f"the task model is a {config.peft_type} prompt-learning PEFT model: it changes no attention weight, so "
            "every head would score 0. Localize a fine-tune that changes the weights (full, LoRA, ALPS, ...)."
        )


def reads_frozen_base(base: Any, task: Any) -> bool:
    """Whether ``base`` must be read without adapters: it is a plain model whose modules the PEFT ``task`` model
    wraps (``task = get_peft_model(base, config)`` adapts ``base`` in place)."""
    if not (isinstance(base, nn.Module) and isinstance(task, nn.Module)) or is_peft_wrapper(base):
        return False
    if not is_peft_wrapper(task):
        return False
    task_modules = {id(m) for m in task.modules() if isinstance(m, BaseTunerLayer)}
    return any(id(m) in task_modules for m in base.modules())
