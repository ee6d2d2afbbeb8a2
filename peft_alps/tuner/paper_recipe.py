"""The paper's training recipe as an ALPS config: every weight trains except the non-selected heads' q/k/v.

ALPS's Table 1 has a "w/o attn" row (q/k/v frozen) that still scores differently from the base model, so in the
paper's arms the weights outside q/k/v train too: "ALPS 10%" there means *everything except the q/k/v slices of
the heads that were not selected*. The plain :class:`~peft_alps.AlpsConfig` is the other reading, heads only.

Both are ordinary PEFT configs. The paper's reading is an ALPS adapter on the q/k/v projections plus PEFT's own
``modules_to_save`` for every other module that holds weights (output projection, MLP, norms), with PEFT's meaning:
those modules train fully and are saved with the adapter, and ``merge_and_unload`` writes them back::

    config = paper_recipe(model, target_heads=heads)          # or head_scores="heads.json", ratio=0.1
    model = get_peft_model(model, config)

The input embedding and the LM head stay frozen: on a model with tied embeddings (SmolLM2, Llama-3.2-1B) PEFT's
copy of a ``modules_to_save`` embedding would untie them. Add them to ``modules_to_save`` yourself on an untied model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peft_alps.tuner.config import AlpsConfig
from peft_alps.layouts import layout_for_config

__all__ = ["modules_outside_attention", "paper_recipe"]

QKV_ROLES = ("q", "k", "v", "qkv", "qkv_grouped")


def _qkv_paths(model: nn.Module) -> list[str]:
    layout, _ = layout_for_config(model.config)
    return [p.path for p in layout.projections if p.role in QKV_ROLES]


def modules_outside_attention(model: nn.Module, target_modules: list[str] | None = None) -> list[str]:
    """Names for PEFT's ``modules_to_save`` that cover every module with weights outside ``target_modules``.

    ``target_modules`` defaults to the model family's q/k/v projections. The input embedding and the LM head are
    left out (see the module docstring). Names are the modules' last components (``"o_proj"``, ``"up_proj"``,
    ``"input_layernorm"``, ``"norm"``), as PEFT matches ``modules_to_save``; a name that would also match a module
    that must stay frozen is refused.
    """
    targets = list(target_modules) if target_modules is not None else _qkv_paths(model)
    frozen = {id(m) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    keep: dict[str, list[str]] = {}
    skip: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        targeted = any(name == t or name.endswith("." + t) for t in targets)
        (skip if targeted or id(module) in frozen else keep).setdefault(leaf, []).append(name)
    clash = sorted(set(keep) & set(skip))
    if clash:
        raise ValueError(f"module name {clash[0]!r} names both a module to train ({keep[clash[0]][0]}) and one that "
                         f"must stay frozen ({skip[clash[0]][0]}); build modules_to_save with full module paths instead")
    if not keep:
        raise ValueError(f"no module with weights lies outside target_modules={targets}: nothing for modules_to_save")
    return sorted(keep)


def paper_recipe(model: nn.Module, **config_kwargs: Any) -> AlpsConfig:
    """An :class:`~peft_alps.AlpsConfig` for the paper's reading: the selected heads' q/k/v slices, plus every other
    weight of the model (``modules_to_save``), embeddings excepted.

    ``config_kwargs`` go to :class:`AlpsConfig` (``target_heads=...`` or ``head_scores=..., ratio=...``, ``bias``,
    ...). ``target_modules`` defaults to the family's q/k/v projections (the paper's θ_h). ``modules_to_save`` is
    what this function computes, so passing it is refused: build the ``AlpsConfig`` yourself for another set.
    """
    if "modules_to_save" in config_kwargs:
        raise ValueError("paper_recipe computes modules_to_save (every module outside q/k/v); to choose your own, "
                         "pass it to AlpsConfig directly instead")
    targets = config_kwargs.pop("target_modules", None) or _qkv_paths(model)
    targets = [targets] if isinstance(targets, str) else sorted(targets)
    return AlpsConfig(target_modules=targets, modules_to_save=modules_outside_attention(model, targets),
                      **config_kwargs)
