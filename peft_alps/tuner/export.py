"""Export an ALPS adapter as a standard PEFT LoRA adapter, exactly, for LoRA-only serving engines.

A head-slice delta is already a low-rank product with a selection matrix, so no SVD is needed:

* rows ``R`` of a q/k/v (or fused qkv) projection, delta ``D`` of shape ``[|R|, in]``:
  ``ΔW = E_R @ D`` with ``E_R`` the ``[out, |R|]`` one-hot selection -> ``lora_B = E_R``, ``lora_A = D``;
* columns ``C`` of an output projection, delta ``D`` of shape ``[out, |C|]``:
  ``ΔW = D @ E_C^T`` -> ``lora_B = D``, ``lora_A = E_C^T``;
* bias entries of rows ``R`` (only adapters made with ``AlpsConfig(alps_bias=True)``): LoRA's ``lora_bias=True``,
  i.e. ``lora_B.bias``, written only for the modules that have bias deltas.

LoRA computes ``lora_B(lora_A(x)) * lora_alpha / r``; with ``lora_alpha = r`` the scale is 1 and the products
above are exact: multiplying by a one-hot matrix only copies numbers, and zero padding adds zeros.

Two forms (``layers=``), because the engines load differently (read from their loader code; docs/serving.md):

* ``"all"`` (default, the complete form): A and B for every targeted projection type in every layer, at one rank;
  modules that own no heads get exact zeros, and when q, k or v is targeted all three are written. ``target_modules``
  are the bare projection names (``q_proj``), matching the tensors. Every LoRA engine serves it as trained: LoRAX
  and TGI drop a projection type as soon as one layer lacks it (and then serve the base model, with only a log
  line), and SGLang needs q, k and v together in every layer.
* ``"owned"`` (the compact form): only the modules that own selected heads, with full module paths. The smallest
  file; PEFT, vLLM and llama.cpp serve it, LoRAX/TGI silently do not, SGLang may refuse it (``export_to_lora``
  warns).

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

from peft_alps.tuner.layer import AlpsLayer
from peft_alps.tuner.stacked_names import canonical_module_names

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
    "ALPS adapter {adapter!r} was trained with alps_bias=True; its bias slices are exported as LoRA biases "
    "(lora_bias=True, lora_B.bias). PEFT loads them (and reports the lora_B.bias of modules without bias deltas as "
    "missing keys: they stay zero). Serving engines refuse them: vLLM says \"vLLM does not support LoRA bias\", "
    "llama.cpp's convert_lora_to_gguf.py says \"Not a lora_A or lora_B tensor\". To serve there, train with "
    "AlpsConfig(alps_bias=False) (the default)."
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
    heads = []
    model = _transformers_model(peft_model)
    # in a mixed model, an ALPS layer wrapped by another tuner sits at ``<name>.base_layer``
    canonical = canonical_module_names(model)
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


def _features(module: nn.Module, transposed: bool) -> tuple[int, int]:
    """``(in_features, out_features)`` of a projection, plain, quantized or wrapped by a PEFT tuner."""
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    for m in (module, base):
        if isinstance(getattr(m, "in_features", None), int) and isinstance(getattr(m, "out_features", None), int):
            return m.in_features, m.out_features
    rows, cols = base.weight.shape  # Conv1D keeps [in, out]; Linear [out, in]
    return (rows, cols) if transposed else (cols, rows)


def _complete(peft_model: nn.Module, heads: list[_Head]) -> tuple[list[_Head], list[str]]:
    """The complete form: every layer's module of each exported projection type (q, k and v together), with zero
    factors where no head is owned; and the ``target_modules`` that name exactly those modules."""
    from peft_alps.layouts import layout_for_config
    model = _transformers_model(peft_model)
    layout, _ = layout_for_config(model.config)
    canonical = canonical_module_names(model)
    names = [canonical.get(n, n) for n, _ in model.named_modules()]
    modules = dict(model.named_modules())
    paths = {layout.match(h.name)[1].path for h in heads}
    roles = {p.role for p in layout.projections if p.path in paths}
    if roles & {"q", "k", "v"}:  # SGLang stacks q/k/v per layer and needs all three
        paths |= {p.path for p in layout.projections if p.role in ("q", "k", "v")}
    owned = {h.name for h in heads}
    transposed = heads[0].transposed
    found: dict[str, _Head] = {}
    for raw, name in zip(modules, names):
        hit = layout.match(name)
        if hit is None or hit[1].path not in paths or name in owned or name in found:
            continue
        n_in, n_out = _features(modules[raw], transposed)
        dtype = heads[0].lora_a.dtype
        found[name] = _Head(name, torch.zeros(0, n_in, dtype=dtype), torch.zeros(n_out, 0, dtype=dtype), None,
                            transposed)
    every = sorted([*heads, *found.values()], key=lambda h: _layer_order(layout, h.name))
    exported = {h.name for h in every}
    targets = []
    for path in sorted(paths):
        bare = path.rsplit(".", 1)[-1]
        clash = any(n.rsplit(".", 1)[-1] == bare and n not in exported for n in names)
        targets.append(path if clash else bare)  # e.g. GPT-2's attn.c_proj beside mlp.c_proj
    return every, targets


def _layer_order(layout, name: str) -> tuple[int, str]:
    layer, projection = layout.match(name)
    return layer, projection.path


def _pad(head: _Head, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = rank - head.rank
    if extra == 0:
        return head.lora_a, head.lora_b
    lora_a = torch.cat([head.lora_a, head.lora_a.new_zeros(extra, head.lora_a.shape[1])], dim=0)
    lora_b = torch.cat([head.lora_b, head.lora_b.new_zeros(head.lora_b.shape[0], extra)], dim=1)
    return lora_a, lora_b


LAYER_FORMS = ("all", "owned")
_OWNED_WARNING = (
    "exporting ALPS adapter {adapter!r} with layers='owned': only {owned} of the {total} (layer, projection) modules "
    "(those that own heads) have LoRA tensors. PEFT, vLLM and llama.cpp serve it as trained; LoRAX and TGI drop every projection type "
    "that some layer lacks and then serve the base model, saying only \"unused adapter weights\"{sglang}. Export with "
    "layers='all' (the default) for those engines."
)


def export_to_lora(
    peft_model: nn.Module,
    output_dir: Union[str, os.PathLike],
    adapter_name: str = "default",
    *,
    layers: str = "all",
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
        layers: ``"all"`` (default): every layer's module of each targeted projection type, q, k and v together,
            zeros where no head is owned; PEFT, vLLM, llama.cpp, SGLang, LoRAX and TGI serve it. ``"owned"``: only
            the modules that own heads (smallest file); PEFT, vLLM and llama.cpp serve it, LoRAX and TGI silently
            serve the base model, SGLang may refuse it (it warns).
        rank: the single LoRA rank of the export. ``None`` uses the smallest rank that fits every module
            (the largest number of rows/columns a module's selected heads own). A rank that some module does not
            fit in is refused before anything is written.
        per_module_ranks: write each module's own rank as ``rank_pattern``/``alpha_pattern`` instead of padding
            to one rank (with ``layers="owned"`` only). Smaller; PEFT and vLLM honour the patterns, llama.cpp does
            not (it warns).
        dtype: dtype of the written tensors (default: the adapter's own dtype).

    Returns:
        ``Path(output_dir)``.
    """
    from safetensors.torch import save_file

    alps_config = _alps_config(peft_model, adapter_name)
    _check_options(layers, rank, per_module_ranks)
    heads = _collect(peft_model, adapter_name, dtype)
    if not heads:
        raise ValueError(f"adapter {adapter_name!r} has no ALPS layers in this model: nothing to export")
    transposed = {h.transposed for h in heads}
    if len(transposed) > 1:
        raise ValueError(
            "this adapter mixes Conv1D ([in, out]) and Linear projections; a LoRA config has a single "
            "fan_in_fan_out flag, so it cannot be exported as one LoRA adapter"
        )
    if layers == "all":
        modules, targets = _complete(peft_model, heads)
    else:
        modules, targets = heads, [h.name for h in heads]
        _warn_if_partial(peft_model, heads, adapter_name)
    rank, top = _choose_rank(modules, rank, per_module_ranks, adapter_name)
    extra = _warn_about_extras(peft_model, alps_config, modules, adapter_name, per_module_ranks, top)

    state, pattern = _lora_tensors(modules, rank, per_module_ranks)
    state.update(extra)
    lora_config = _lora_config(alps_config, targets, top, pattern, any(h.bias is not None for h in modules),
                               transposed.pop(), bool(extra))
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.save_pretrained(str(out))
    _record_provenance(out, alps_config, per_module_ranks, layers)
    return out


def _alps_config(peft_model: nn.Module, adapter_name: str) -> Any:
    configs = getattr(peft_model, "peft_config", {})
    if adapter_name not in configs:
        raise ValueError(f"adapter {adapter_name!r} not found; this model has {sorted(configs)}")
    kind = getattr(configs[adapter_name], "peft_type", None)
    if kind != "ALPS":
        raise ValueError(
            f"adapter {adapter_name!r} is a {getattr(kind, 'value', kind)} adapter; export_to_lora exports ALPS adapters"
        )
    return configs[adapter_name]


def _check_options(layers: str, rank: Optional[int], per_module_ranks: bool) -> None:
    if layers not in LAYER_FORMS:
        raise ValueError(f"layers={layers!r} is not valid; use 'all' (every layer, every engine) or 'owned' (only "
                         "the modules that own heads: PEFT, vLLM, llama.cpp)")
    if rank is not None and per_module_ranks:
        raise ValueError("pass either rank=... (one rank for all modules) or per_module_ranks=True, not both")
    if per_module_ranks and layers == "all":
        raise ValueError("per_module_ranks=True gives each module the rank its heads need, and modules without heads "
                         "need none: pass layers='owned' with it (or drop per_module_ranks for the complete form)")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ValueError(f"rank must be a positive integer, got {rank!r}")


def _choose_rank(modules: list[_Head], rank: Optional[int], per_module_ranks: bool,
                 adapter_name: str) -> tuple[int, int]:
    """The padded rank, and the largest rank written (the config's ``r``); refuses a rank some module exceeds."""
    needed = max(h.rank for h in modules)
    rank = needed if rank is None else rank
    too_big = [h for h in modules if h.rank > rank]
    if too_big:
        worst = sorted(too_big, key=lambda h: -h.rank)[:3]
        raise ValueError(
            f"rank {rank} is too small for ALPS adapter {adapter_name!r}: "
            + ", ".join(f"{h.name} needs rank {h.rank}" for h in worst)
            + (f" (and {len(too_big) - 3} more modules)" if len(too_big) > 3 else "")
            + f". Pass rank>={needed}, or per_module_ranks=True for engines that honour rank_pattern, or select "
            "fewer heads per layer. Nothing was written."
        )
    return rank, (rank if not per_module_ranks else needed)


def _warn_if_partial(peft_model: nn.Module, heads: list[_Head], adapter_name: str) -> None:
    """One warning for a compact export that some engines cannot serve as trained."""
    from peft_alps.layouts import layout_for_config

    complete, _ = _complete(peft_model, heads)
    if len(complete) == len(heads):
        return
    layout, _ = layout_for_config(_transformers_model(peft_model).config)
    per_layer: dict[int, set[str]] = {}
    for h in heads:
        layer, proj = layout.match(h.name)
        per_layer.setdefault(layer, set()).add(proj.role)
    split_qkv = any(0 < len(roles & {"q", "k", "v"}) < 3 for roles in per_layer.values())
    sglang = ("; SGLang raises on a layer with q but not v (at load) or k/v without q (at the first batch)"
              if split_qkv else "")
    warnings.warn(_OWNED_WARNING.format(adapter=adapter_name, owned=len(heads), total=len(complete), sglang=sglang))


def _warn_about_extras(peft_model: nn.Module, alps_config: Any, modules: list[_Head], adapter_name: str,
                       per_module_ranks: bool, top: int) -> dict[str, torch.Tensor]:
    """The warnings of what some engine refuses (rank, biases, patterns, modules_to_save); returns the extras."""
    if top > VLLM_MAX_RANK:  # vLLM checks the largest of r and the rank_pattern values
        warnings.warn(
            f"exporting ALPS adapter {adapter_name!r} at LoRA rank {top}: vLLM serves ranks up to {VLLM_MAX_RANK}. "
            "Select fewer heads per layer (or narrow target_modules) for vLLM."
        )
    if any(h.bias is not None for h in modules):
        warnings.warn(_BIAS_WARNING.format(adapter=adapter_name))
    if per_module_ranks and len({h.rank for h in modules}) > 1:
        warnings.warn(_PATTERN_WARNING.format(adapter=adapter_name, alpha=top))
    extra = _modules_to_save_state(peft_model, adapter_name)
    if extra:
        warnings.warn(
            f"ALPS adapter {adapter_name!r} also trains modules_to_save={sorted(alps_config.modules_to_save)}; they "
            "are exported as PEFT saves them. PEFT loads them; LoRA serving engines generally do not."
        )
    return extra


def _lora_tensors(modules: list[_Head], rank: int, per_module_ranks: bool) -> tuple[dict[str, torch.Tensor],
                                                                                     dict[str, int]]:
    state: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    for head in modules:
        r = head.rank if per_module_ranks else rank
        lora_a, lora_b = _pad(head, r)
        key = f"{_PREFIX}{head.name}"
        state[f"{key}.lora_A.weight"] = lora_a.contiguous()
        state[f"{key}.lora_B.weight"] = lora_b.contiguous()
        if head.bias is not None:  # modules without bias deltas get none, not a zero vector
            state[f"{key}.lora_B.bias"] = head.bias.contiguous()
        rank_pattern[head.name] = r
    return state, (rank_pattern if per_module_ranks else {})


def _lora_config(alps_config: Any, targets: list[str], top: int, pattern: dict[str, int], use_bias: bool,
                 fan_in_fan_out: bool, with_extras: bool):
    from peft import LoraConfig

    return LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=list(targets),
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        lora_dropout=0.0,
        bias="none",
        lora_bias=use_bias,
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=list(alps_config.modules_to_save) if with_extras else None,
        task_type=alps_config.task_type,
        base_model_name_or_path=alps_config.base_model_name_or_path,
        revision=alps_config.revision,
        inference_mode=True,
    )


def _modules_to_save_state(peft_model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The adapter's ``modules_to_save`` copies, keyed as PEFT saves them (the same for every adapter type)."""
    if not getattr(peft_model.peft_config[adapter_name], "modules_to_save", None):
        return {}
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items() if ".alps_" not in k}


def _record_provenance(out: Path, alps_config: Any, per_module_ranks: bool, layers: str) -> None:
    """Note where the LoRA came from in a README next to the adapter (PEFT ignores extra files)."""
    heads = alps_config.target_heads
    form = ("every layer (zeros where no head is owned)" if layers == "all" else "only the modules that own heads")
    text = (
        "# LoRA exported from an ALPS adapter\n\n"
        "Exact export (selection-matrix factors, no SVD) made with `peft_alps.export_to_lora`.\n"
        f"Trained heads ({sum(len(h) for h in heads.values())}): `{json.dumps({str(k): v for k, v in heads.items()})}`\n"
        f"Modules: {form}.\n"
        f"Ranks: {'per module (rank_pattern/alpha_pattern)' if per_module_ranks else 'one rank, lora_alpha = r'}.\n"
    )
    readme = out / "README.md"
    if not readme.exists():
        readme.write_text(text)
