"""A live transformers model as an attention source: read module by module (a bitsandbytes 4/8-bit weight is
dequantized one layer at a time), with a PEFT model's active adapter deltas added unless ``frozen``."""

from __future__ import annotations

import torch

from peft_alps.localization.sources.base import SCORED_ROLES, AttentionSource, LayerTensors, check_finite, claim_slot
from peft_alps.layouts import Projection


class ModuleSource(AttentionSource):
    """Attention weights of a loaded transformers model, read (and dequantized if 4/8-bit) a layer at a time.

    A PEFT model (or a model with adapters injected) is read as its forward pass computes, i.e. with its active
    adapters' deltas added, one projection at a time and without changing the model; ``frozen=True`` reads it
    without adapters. See :mod:`peft_alps.localization.sources.adapted_weights`."""

    def __init__(self, model: torch.nn.Module, name: str | None = None, frozen: bool = False):
        from peft_alps.localization.sources.adapted_weights import check_localizable

        check_localizable(model)
        self.frozen = frozen
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "model_type"):
            raise ValueError(
                f"cannot localize heads of a {type(model).__name__}: pass a transformers model (with a "
                "config.model_type), a checkpoint folder or a Hub repo id"
            )
        self.name = name or getattr(config, "_name_or_path", "") or type(model).__name__
        self._init_layout(config)
        self._modules: dict[tuple[int, Projection], tuple[str, torch.nn.Module]] = {}
        for module_name, module in model.named_modules():
            found = self.layout.match(module_name)
            if found and found[1].role in SCORED_ROLES and found[0] < self.dims.num_layers:
                claim_slot(self._modules, found, module_name, (module_name, module), self)
                self._modules[found] = (module_name, module)
        missing = [
            f"{self.layout.layers}.{layer}.{proj.path}"
            for layer in range(self.dims.num_layers) for proj in self.projections
            if (layer, proj) not in self._modules
        ]
        if missing:
            raise ValueError(
                f"model {self.name!r} lacks the attention modules that localization needs: missing {missing[0]!r}"
                + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
            )

    def layer(self, index: int) -> LayerTensors:
        from peft_alps.localization.sources.adapted_weights import projection_weight

        out = {}
        for proj in self.projections:
            module_name, module = self._modules[(index, proj)]
            with torch.no_grad():
                weight = projection_weight(module, module_name, _stored_weight, frozen=self.frozen).to("cpu")
            out[proj] = check_finite(weight, f"{module_name}.weight", f"model {self.name!r}")
        return out


def _stored_weight(module: torch.nn.Module) -> torch.Tensor:
    """A plain layer's weight; bitsandbytes 4/8-bit etc.: this one layer, dequantized (a CPU 4-bit weight that
    bitsandbytes repacked for inference is restored first, inside dequantized_weight)."""
    from peft_alps.tuner.quantization import dequantized_weight, is_quantized_linear

    if is_quantized_linear(module):
        return dequantized_weight(module, dtype=None)
    return module.weight.detach()
