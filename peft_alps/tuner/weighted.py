"""``AlpsModel.add_weighted_adapter``: a new ALPS adapter whose delta is exactly ``sum_i w_i * delta_i``.

An ALPS delta is a set of head slices, so a weighted sum of several adapters is again an ALPS delta, over the union
of their slices: no low-rank approximation (LoRA's ``svd``, ``ties``, ``dare_*`` ...) is needed or offered. The new
adapter trains the union of the adapters' ``target_heads`` on the union of their ``target_modules``; each source
slice is added into it at its rows (or columns) with ``index_add``, so the merged weights are
``W + sum_i w_i * dW_i`` to floating-point rounding.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from peft_alps.tuner.config import AlpsConfig
from peft_alps.tuner.layer import AlpsLayer

COMBINATION_TYPES = ("linear",)


def _check_request(tuner: Any, adapters: Sequence[str], weights: Sequence[float], combination_type: str) -> None:
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"combination_type={combination_type!r} is not available for ALPS adapters: their head-slice deltas add "
            "up exactly, so the only combination is combination_type='linear' (the default), which gives "
            "W + sum(w_i * dW_i). LoRA's svd/cat/ties/dare/magnitude_prune approximations have no ALPS counterpart."
        )
    if isinstance(adapters, str) or not adapters:
        raise ValueError(f"adapters must be a non-empty list of adapter names, got {adapters!r}")
    for adapter in adapters:
        if adapter not in tuner.peft_config:
            raise ValueError(f"Adapter {adapter} does not exist (this model has {sorted(tuner.peft_config)})")
        if not isinstance(tuner.peft_config[adapter], AlpsConfig):
            raise ValueError(f"adapter {adapter!r} is not an ALPS adapter; only ALPS adapters combine here")
    if len(set(adapters)) != len(adapters):
        raise ValueError(f"adapters {list(adapters)} name an adapter twice; list each once and add up its weights")
    if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
        raise ValueError(f"weights must give one number per adapter: {len(adapters)} adapters, weights={weights!r}")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"weights must be finite numbers, got {weight!r} in {list(weights)}")


def combined_config(configs: dict[str, AlpsConfig], weights: Sequence[float]) -> AlpsConfig:
    """The config of the combination: union of ``target_heads`` and ``target_modules`` (and bias entries if any
    adapter trains them); the geometry, exclusions and extra modules must agree (the error says which adapters differ and how)."""
    names = list(configs)
    first = configs[names[0]]
    layouts = {name: c.head_layout for name, c in configs.items() if c.head_layout}
    if len({tuple(sorted(layout.items())) for layout in layouts.values()}) > 1:
        described = "; ".join(f"{name}: {layout}" for name, layout in layouts.items())
        raise ValueError(
            f"cannot combine ALPS adapters built for different attention geometries ({described}); each adapter "
            "must come from the base model it is combined on"
        )
    kinds = {name: type(c.target_modules) for name, c in configs.items()}
    if len(set(kinds.values())) > 1:
        raise ValueError(
            "all adapter configs should follow the same target modules type. Combining adapters with "
            f"`target_modules` type being a mix of list/set and string is not supported (got "
            f"{ {name: kind.__name__ for name, kind in kinds.items()} })."
        )
    if isinstance(first.target_modules, str):
        target_modules: Any = "|".join(f"({c.target_modules})" for c in configs.values())
    else:
        target_modules = set().union(*(c.target_modules for c in configs.values()))
    excludes = {name: c.exclude_modules for name, c in configs.items()}
    if any(value != first.exclude_modules for value in excludes.values()):
        raise ValueError(
            f"the adapters exclude different modules ({excludes}): the combination would miss slices of some of "
            "them. Combine adapters with the same exclude_modules."
        )
    with_extra = [name for name, c in configs.items() if c.modules_to_save]
    if with_extra:
        raise ValueError(
            f"adapter(s) {with_extra} train whole modules (modules_to_save), which do not combine as head slices; "
            "add_weighted_adapter combines ALPS adapters without modules_to_save"
        )
    heads: dict[int, set[int]] = {}
    for config in configs.values():
        for layer, layer_heads in config.target_heads.items():
            heads.setdefault(layer, set()).update(layer_heads)
    return dataclasses.replace(
        first,
        target_heads={layer: sorted(h) for layer, h in sorted(heads.items())},
        target_modules=target_modules,
        alps_bias=any(c.alps_bias for c in configs.values()),  # keep every bias slice
        init_weights=True,
        head_scores=None,
        ratio=None,
        k=None,
        head_selection={"weighted_combination": dict(zip(names, map(float, weights)))},
    )


@torch.no_grad()
def _fill(layer: AlpsLayer, key: str, adapter_name: str, adapters: Sequence[str], weights: Sequence[float]) -> None:
    """Write ``sum_i w_i * delta_i`` into ``adapter_name``'s slices of one layer."""
    index = layer.alps_index[adapter_name]
    dim = 0 if layer.axis == "out" else 1
    targets = [(layer.alps_delta, dim)] + ([(layer.alps_bias, 0)] if adapter_name in layer.alps_bias else [])
    for params, _ in targets:
        params[adapter_name].zero_()
    for source, weight in zip(adapters, weights):
        if source not in layer.alps_delta:
            continue
        source_index = layer.alps_index[source].to(index.device)
        position = torch.searchsorted(index, source_index).clamp_(max=len(index) - 1)
        if not torch.equal(index[position], source_index):
            raise RuntimeError(f"{key}: the slices of {source!r} are not inside the combined adapter's slices")
        for params, axis in targets:
            if source in params:
                target = params[adapter_name]
                target.index_add_(axis, position.to(target.device), params[source].to(target.dtype), alpha=weight)


def add_weighted_adapter(
    tuner: Any, adapters: Sequence[str], weights: Sequence[float], adapter_name: str, combination_type: str = "linear"
) -> None:
    """See :meth:`peft_alps.AlpsModel.add_weighted_adapter`."""
    if adapter_name in tuner.peft_config:
        warnings.warn(f"adapter {adapter_name!r} already exists; add_weighted_adapter left it as it is (as LoRA does)")
        return
    _check_request(tuner, adapters, weights, combination_type)
    weights = [float(w) for w in weights]
    tuner.peft_config[adapter_name] = combined_config({a: tuner.peft_config[a] for a in adapters}, weights)
    try:
        tuner.inject_adapter(tuner.model, adapter_name)
        for key, layer in tuner.model.named_modules():
            if isinstance(layer, AlpsLayer):
                if adapter_name in layer.alps_delta:
                    _fill(layer, key, adapter_name, adapters, weights)
                    layer.alps_delta[adapter_name].requires_grad_(False)
                    if adapter_name in layer.alps_bias:
                        layer.alps_bias[adapter_name].requires_grad_(False)
                elif any(a in layer.alps_delta for a in adapters):
                    raise RuntimeError(f"{key}: the combined adapter does not cover the layer of {adapters}")
    except Exception:
        _remove(tuner, adapter_name)
        raise


def _remove(tuner: Any, adapter_name: str) -> None:
    """Undo a failed combination: the model keeps only the adapters it had."""
    if any(isinstance(m, AlpsLayer) and adapter_name in m.alps_delta for m in tuner.model.modules()):
        tuner.delete_adapter(adapter_name)
    tuner.peft_config.pop(adapter_name, None)
