"""Quantized base layers (bitsandbytes 4-bit / 8-bit): which ones ALPS can wrap, and how to read their weights.

ALPS wraps a quantized projection the same way PEFT's own tuners do since PEFT 0.21: the base layer stays as
loaded (``bnb.nn.Linear4bit`` / ``bnb.nn.Linear8bitLt`` from transformers' ``BitsAndBytesConfig``) and computes
as usual; PEFT's :func:`peft.utils.resolve_quantization_backend` gives the layer a backend that dequantizes and
re-quantizes its weight for merging.

One CPU-only wrinkle of bitsandbytes 0.50 is handled here. In eval mode without gradients, a CPU
``Linear4bit`` rewrites its weight *in place* into an AVX512-BF16 inference layout (bf16 block scales, tiles of
32 rows). That layout

* cannot be dequantized by ``bnb.functional.dequantize_4bit`` (merging would read garbage),
* has no autograd kernel, so a later training step silently drops the gradient that flows through it,
* and rounds the block scales to bf16.

:func:`keep_cpu_4bit_trainable` switches that rewrite off for every 4-bit layer of a model (and undoes it where it
already happened); ALPS calls it when an adapter is put on a 4-bit model. :func:`dequantized_weight` returns the
float ``[out, in]`` weight of any supported layer, one layer at a time, for merging and for head scoring.
"""

from __future__ import annotations

import torch
from peft.utils import resolve_quantization_backend
from torch import nn


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:  # the bnb extra is optional
        return None
    return bnb


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_quantized_linear(module: nn.Module) -> bool:
    """True for a quantized linear layer that PEFT has a backend for (bnb 4/8-bit, HQQ, torchao, GPTQ, ...)."""
    try:
        backend = resolve_quantization_backend(module)
    except ValueError:  # torchao without its config: still a quantized linear, merging is what fails
        return True
    return backend is not None and backend.layer_type == "linear"


def _is_cpu_packed(module: nn.Module) -> bool:
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    return bool(getattr(state, "packing_format_for_cpu", False))


@torch.no_grad()
def restore_4bit_layout(module: nn.Module) -> bool:
    """Undo bitsandbytes' CPU inference repacking of one ``Linear4bit`` weight. Returns True if it was repacked.

    bitsandbytes' own inverse leaves the (non-nested) block scales transposed and in bf16; they are put back in
    the original order and dtype here. The bf16 rounding of the scales cannot be undone.
    """
    if not _is_cpu_packed(module):
        return False
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight = module.weight
    state = weight.quant_state
    nested = state.original_nested
    packed_absmax = state.absmax  # [in // blocksize, out], bf16
    data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if not nested:
        state.absmax = packed_absmax.T.reshape(-1).to(torch.float32).contiguous()
    weight.data = data
    weight.quant_state = state
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = state
    return True


def keep_cpu_4bit_trainable(model: nn.Module) -> int:
    """Stop bitsandbytes from repacking the model's 4-bit weights for CPU inference; undo it where it happened.

    Returns the number of 4-bit layers visited. Harmless on GPU models (the repacking is CPU-only) and on
    bitsandbytes versions without it.
    """
    count = 0
    for module in model.modules():
        if is_bnb_4bit(module):
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
            restore_4bit_layout(module)
            count += 1
    return count


@torch.no_grad()
def dequantized_weight(module: nn.Module, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
    """The ``[out, in]`` weight of a (possibly quantized) linear layer as a new float tensor.

    Works for ``nn.Linear`` and every quantized linear PEFT has a merge-capable backend for; the result never
    aliases the layer's storage. Only this one layer is dequantized, so a large quantized model can be read layer
    by layer.
    """
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    backend = resolve_quantization_backend(base)
    if backend is None:
        weight = base.weight.detach().clone()
    else:
        if not backend.supports_merge:
            raise TypeError(
                f"cannot read the weight of a {type(base).__name__} ({backend.backend_name}): PEFT has no way to "
                "dequantize it. Use a bitsandbytes 4-bit/8-bit, HQQ or torchao base, or an unquantized one."
            )
        restore_4bit_layout(base)
        weight = backend.get_base_weight(base).detach().clone()
    return weight if dtype is None else weight.to(dtype)
