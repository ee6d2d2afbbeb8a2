"""Export an ALPS adapter as a standard PEFT LoRA adapter, exactly, for LoRA-only serving engines.

A head-slice delta is already a low-rank product with a selection matrix, so no SVD is needed:

* rows ``R`` of a q/k/v (or fused qkv) projection, delta ``D`` of shape ``[|R|, in]``:
  ``ΔW = E_R @ D`` with ``E_R`` the ``[out, |R|]`` one-hot selection -> ``lora_B = E_R``, ``lora_A = D``;
* columns ``C`` of an output projection, delta ``D`` of shape ``[out, |C|]``:
  ``ΔW = D @ E_C^T`` -> ``lora_B = D``, ``lora_A = E_C^T``;
* bias entries of rows ``R`` (only adapters made with ``AlpsConfig(bias="heads")``): LoRA's ``lora_bias=True``,
  i.e. ``lora_B.bias``, written only for the modules that have bias deltas.

LoRA computes ``lora_B(lora_A(x)) * lora_alpha / r``; with ``lora_alpha = r`` the scale is 1 and the products
above are exact: multiplying by a one-hot matrix only copies numbers, and zero padding adds zeros.

What the serving engines accept (read from their code, vLLM's ``vllm/lora/peft_helper.py`` and llama.cpp's
``convert_lora_to_gguf.py`` / ``src/llama-adapter.h``):

* default (``per_module_ranks=False``): one rank ``r`` for every module, smaller slices zero-padded, and
  ``lora_alpha = r``, so every module's scale is 1 in any engine. vLLM serves ranks up to ``--max-lora-rank``
  (at most 512); llama.cpp has no rank limit.
* ``per_module_ranks=True``: each module gets exactly the rank its slices need, written as ``rank_pattern`` /
  ``alpha_pattern`` (alpha = rank, so every scale is 1). PEFT and vLLM apply the patterns per module (vLLM's
  ``PEFTHelper`` matches them as PEFT does). llama.cpp does not: its converter keeps only the global
  ``lora_alpha`` and scales each tensor by ``lora_alpha / its own rank``, so every module whose rank is below the
  largest one is scaled up, and the adapter is wrong there.
* biases: vLLM refuses ``lora_bias=True`` ("vLLM does not support LoRA bias"), and llama.cpp's converter stops at
  a ``lora_B.bias`` tensor ("Not a lora_A or lora_B tensor"). Adapters with the default ``bias="none"`` have none.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from .layer import AlpsLayer

#: Largest LoRA rank vLLM serves (its ``max_lora_rank`` choices end at 512).
VLLM_MAX_RANK = 512
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class _Head:
    """One exported module: its LoRA factors before padding."""

    name: str  # module path inside the transformers model
    lora_a: torch.Tensor  # [n, in]
    lora_b: torch.Tensor  # [out, n]
    bias: Optional[torch.Tensor]  # [out] or None
    transposed: bool

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def _factors(layer: AlpsLayer, adapter_name: str, dtype: Optional[torch.dtype]) -> tuple[torch.Tensor, torch.Tensor]:
    delta = layer.alps_delta[adapter_name].detach()
    dtype = dtype or delta.dtype
    delta = delta.to(dtype=dtype, device="cpu")
    index = layer.alps_index[adapter_name].to("cpu")
    n = index.numel()
    columns = torch.arange(n)
    if layer.axis == "out":
        selection = torch.zeros(layer.out_features, n, dtype=dtype)
        selection[index, columns] = 1
        return delta, selection  # lora_A = D [n, in], lora_B = E_R [out, n]
    selection = torch.zeros(n, layer.in_features, dtype=dtype)
    selection[columns, index] = 1
    return selection, delta  # lora_A = E_C^T [n, in], lora_B = D [out, n]


_BIAS_WARNING = (
    "ALPS adapter {adapter!r} was trained with bias='heads'; its bias slices are exported as LoRA biases "
    "(lora_bias=True, lora_B.bias). PEFT loads them (and reports the lora_B.bias of modules without bias deltas as "
    "missing keys: they stay zero). Serving engines refuse them: vLLM says \"vLLM does not support LoRA bias\", "
    "llama.cpp's convert_lora_to_gguf.py says \"Not a lora_A or lora_B tensor\". To serve there, train with "
    "AlpsConfig(bias='none') (the default)."
)
_PATTERN_WARNING = (
    "exporting ALPS adapter {adapter!r} with per_module_ranks=True: PEFT and vLLM apply rank_pattern/alpha_pattern "
    "per module, but llama.cpp applies the one global lora_alpha={alpha} to every module, scaled by each tensor's own "
    "rank, so modules with a smaller rank come out scaled up and the adapter is wrong there. For llama.cpp export "
    "with the default one rank (per_module_ranks=False)."
)


def _transformers_model(peft_model: nn.Module) -> nn.Module:
    """The model the adapter sits in (``PeftModel`` and ``PeftMixedModel`` both keep it at ``base_model.model``)."""
    tuner = getattr(peft_model, "base_model", None)
    inner = getattr(tuner, "model", None)
    return inner if isinstance(inner, nn.Module) else peft_model


def _collect(peft_model: nn.Module, adapter_name: str, dtype: Optional[torch.dtype]) -> list[_Head]:
    from .mixed import _canonical_module_names

    heads = []
    model = _transformers_model(peft_model)
    # in a mixed model, an ALPS layer wrapped by another tuner sits at ``<name>.base_layer``
    canonical = _canonical_module_names(model)
    for name, module in model.named_modules():
        if not isinstance(module, AlpsLayer) or adapter_name not in module.alps_delta:
            continue
        name = canonical.get(name, name)
        lora_a, lora_b = _factors(module, adapter_name, dtype)
        bias = module.get_delta_bias(adapter_name)
        if bias is not None:
            bias = bias.detach().to(dtype=lora_a.dtype, device="cpu")
        heads.append(_Head(name, lora_a, lora_b, bias, bool(module.transposed)))
    return heads


def _pad(head: _Head, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - head.rank
    if extra == 0:
        return head.lora_a, head.lora_b
    lora_a = torch.cat([head.lora_a, head.lora_a.new_zeros(extra, head.lora_a.shape[1])], dim=0)
    lora_b = torch.cat([head.lora_b, head.lora_b.new_zeros(head.lora_b.shape[0], extra)], dim=1)
    return lora_a, lora_b


def export_to_lora(
    peft_model: nn.Module,
    output_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    rank: Optional[int] = None,
    per_module_ranks: bool = False,
    dtype: Optional[torch.dtype] = None,
) -> Path:
    """Write ``adapter_name`` of an ALPS ``peft_model`` to ``output_dir`` as a standard PEFT LoRA adapter.

    The result (``adapter_config.json`` + ``adapter_model.safetensors``) loads with plain PEFT, without
    peft_alps, and reproduces the ALPS outputs up to float rounding.

    Args:
        peft_model: a ``PeftModel`` holding the ALPS adapter.
        output_dir: directory to write (created if needed).
        adapter_name: which ALPS adapter to export.
        rank: the single LoRA rank of the default export. ``None`` uses the smallest rank that fits every module
            (the largest number of rows/columns a module's selected heads own). A rank that some module does not
            fit in is refused before anything is written.
        per_module_ranks: write each module's own rank as ``rank_pattern``/``alpha_pattern`` instead of padding
            to one rank. Smaller; PEFT and vLLM honour the patterns, llama.cpp does not (it warns), so keep the
            default for llama.cpp.
        dtype: dtype of the written tensors (default: the adapter's own dtype).

    Returns:
        ``Path(output_dir)``.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    configs = getattr(peft_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; this model has {sorted(configs)}")
    alps_config = configs[adapter_name]
    kind = getattr(alps_config, "peft_type", None)
    if kind != "ALPS":
        raise ValueError(
            f"adapter {adapter_name!r} is a {getattr(kind, 'value', kind)} adapter; export_to_lora exports ALPS adapters"
        )
    if rank is not None and per_module_ranks:
        raise ValueError("pass either rank=... (one rank for all modules) or per_module_ranks=True, not both")
    heads = _collect(peft_model, adapter_name, dtype)
    if not heads:
        raise ValueError(f"adapter {adapter_name!r} has no ALPS layers in this model: nothing to export")

    # ---- validate everything before the first byte is written
    needed = max(h.rank for h in heads)
    if rank is None:
        rank = needed
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    too_big = [h for h in heads if h.rank > rank]
    if too_big:
        worst = sorted(too_big, key=lambda h: -h.rank)[:3]
        raise ValueError(
            f"rank {rank} is too small for ALPS adapter {adapter_name!r}: "
            + ", ".join(f"{h.name} needs rank {h.rank}" for h in worst)
            + (f" (and {len(too_big) - 3} more modules)" if len(too_big) > 3 else "")
            + f". Pass rank>={needed}, or per_module_ranks=True for engines that honour rank_pattern, or select "
            "fewer heads per layer. Nothing was written."
        )
    transposed = {h.transposed for h in heads}
    if len(transposed) > 1:
        raise ValueError(
            "this adapter mixes Conv1D ([in, out]) and Linear projections; a LoRA config has a single "
            "fan_in_fan_out flag, so it cannot be exported as one LoRA adapter"
        )
    top = rank if not per_module_ranks else needed
    if top > VLLM_MAX_RANK:  # vLLM checks the largest of r and the rank_pattern values
        warnings.warn(
            f"exporting ALPS adapter {adapter_name!r} at LoRA rank {top}: vLLM serves ranks up to {VLLM_MAX_RANK}. "
            "Select fewer heads per layer (or narrow target_modules) for vLLM."
        )
    use_bias = any(h.bias is not None for h in heads)
    if use_bias:
        warnings.warn(_BIAS_WARNING.format(adapter=adapter_name))
    if per_module_ranks and len({h.rank for h in heads}) > 1:
        warnings.warn(_PATTERN_WARNING.format(adapter=adapter_name, alpha=top))

    extra = _modules_to_save_state(peft_model, adapter_name)
    if extra:
        warnings.warn(
            f"ALPS adapter {adapter_name!r} also trains modules_to_save={sorted(alps_config.modules_to_save)}; they "
            "are exported as PEFT saves them. PEFT loads them; LoRA serving engines generally do not."
        )

    state: dict[str, torch.Tensor] = dict(extra)
    rank_pattern: dict[str, int] = {}
    for head in heads:
        r = head.rank if per_module_ranks else rank
        lora_a, lora_b = _pad(head, r)
        key = f"{_PREFIX}{head.name}"
        state[f"{key}.lora_A.weight"] = lora_a.contiguous()
        state[f"{key}.lora_B.weight"] = lora_b.contiguous()
        if head.bias is not None:  # modules without bias deltas get none, not a zero vector
            state[f"{key}.lora_B.bias"] = head.bias.contiguous()
        rank_pattern[head.name] = r

    pattern = rank_pattern if per_module_ranks else {}
    lora_config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=[h.name for h in heads],
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        lora_bias=use_bias,
        fan_in_fan_out=transposed.pop(),
        modules_to_save=list(alps_config.modules_to_save) if extra else None,
        task_type=alps_config.task_type,
        base_model_name_or_path=alps_config.base_model_name_or_path,
        revision=alps_config.revision,
        inference_mode=True,
    )

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.save_pretrained(str(out))
    _record_provenance(out, alps_config, per_module_ranks)
    return out


def _modules_to_save_state(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies, keyed as PEFT saves them (the same for every adapter type)."""
    if not getattr(peft_model.peft_config[adapter_name], "modules_to_save", None):
        return {}
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if ".alps_" not in k}


def _record_provenance(out: Path, alps_config: Any, per_module_ranks: bool) -> None:
    """Note where the LoRA came from in a README next to the adapter (PEFT ignores extra files)."""
    heads = alps_config.target_heads
    text = (
        "# LoRA exported from an ALPS adapter\n\n"
        "Exact export (selection-matrix factors, no SVD) made with `peft_alps.export_to_lora`.\n"
        f"Trained heads ({sum(len(h) for h in heads.values())}): `{json.dumps({str(k): v for k, v in heads.items()})}`\n"
        f"Ranks: {'per module (rank_pattern/alpha_pattern)' if per_module_ranks else 'one rank, lora_alpha = r'}.\n"
    )
    readme = out / "README.md"
    if not readme.exists():
        readme.write_text(text)
