"""ALPS tuner layer: a frozen projection plus trainable deltas on the selected heads' slices only.

A projection's heads are either output rows (q, k, v and fused qkv) or input columns (o). For each adapter
the layer stores

* ``alps_delta[name]``: ``[len(index), in_features]`` for row slices, ``[out_features, len(index)]`` for
  column slices, in ``[out, in]`` orientation whatever the base layer's storage;
* ``alps_bias[name]``: ``[len(index)]``, only with ``alps_bias=True``, for row slices of a base layer that has a bias;
* ``alps_index[name]``: the row/column indices (a non-persistent buffer; it is rebuilt from the config's
  ``target_heads`` and never saved).

The forward pass never materialises a full-size delta: row slices add ``x @ delta.T`` into the selected output
columns with ``index_add``; column slices gather the selected input features with ``index_select`` first.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from peft.utils import quantization_extra_repr, resolve_quantization_backend
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_alps.tuner.quantization import is_quantized_linear, restore_4bit_layout

Axis = Literal["out", "in"]


def broken_adapter_error(adapter_name: str, detail: str) -> ValueError:
    """The ``safe_merge`` error: PEFT's own message text (which callers match on), then what ALPS found."""
    return ValueError(
        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: {detail}"
    )


class AlpsLayer(BaseTunerLayer):
    adapter_layer_names = ("alps_delta", "alps_bias")
    other_param_names = ("alps_index",)

    def __init__(self, base_layer: nn.Module, axis: Axis, transposed: bool = False, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.axis = axis
        self.transposed = transposed
        self.alps_delta = nn.ParameterDict({})
        self.alps_bias = nn.ParameterDict({})
        self.alps_index = BufferDict({}, persistent=False)
        self._disable_adapters = False
        self.merged_adapters = []
        self.quantization_backend = resolve_quantization_backend(
            self.get_base_layer(), get_apply_tensor_subclass=kwargs.get("get_apply_tensor_subclass")
        )
        in_features, out_features = _get_in_out_features(self.get_base_layer())
        if None in (in_features, out_features):
            raise TypeError(f"ALPS cannot wrap {type(self.get_base_layer()).__name__}: it has no linear weight")
        self.in_features, self.out_features = in_features, out_features
        self.kwargs = kwargs

    @property
    def _base_has_bias(self) -> bool:
        return getattr(self.get_base_layer(), "bias", None) is not None

    def update_layer(
        self,
        adapter_name: str,
        index: list[int],
        init_weights: bool = True,
        inference_mode: bool = False,
        train_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        """Create the delta of ``adapter_name`` covering ``index`` (rows or columns, depending on ``self.axis``);
        with ``train_bias`` also a delta of the selected bias entries, for row slices of a base with a bias."""
        limit = self.out_features if self.axis == "out" else self.in_features
        if not index or min(index) < 0 or max(index) >= limit:
            raise ValueError(
                f"head slice {index[:1]}..{index[-1:]} does not fit this layer's {limit} "
                f"{'output rows' if self.axis == 'out' else 'input columns'}"
            )
        n = len(index)
        shape = (n, self.in_features) if self.axis == "out" else (self.out_features, n)
        self.alps_index[adapter_name] = torch.tensor(index, dtype=torch.long)
        self.alps_delta[adapter_name] = nn.Parameter(torch.zeros(shape))
        if train_bias and self.axis == "out" and self._base_has_bias:
            self.alps_bias[adapter_name] = nn.Parameter(torch.zeros(n))
        if not init_weights:
            self._random_init(adapter_name)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    @torch.no_grad()
    def _random_init(self, adapter_name: str) -> None:
        # Small non-zero deltas, used by tests to exercise merge/unmerge without training. Drawn from the global RNG,
        # as LoRA's init_lora_weights=False: two adapters differ, and torch.manual_seed makes them reproducible.
        for params in (self.alps_delta, self.alps_bias):
            if adapter_name in params:
                p = params[adapter_name]
                p.copy_(torch.randn(p.shape) * 0.02)

    # ----------------------------------------------------------------------------------- merge / unmerge

    def _stored_index(self, axis: Axis) -> int:
        """Dimension of the stored weight tensor that ``axis`` refers to."""
        dim = 0 if axis == "out" else 1
        return 1 - dim if self.transposed else dim

    def get_base_weight(self) -> torch.Tensor:
        # A CPU 4-bit weight repacked by bitsandbytes for inference cannot be dequantized; put it back first.
        if self.quantization_backend is not None:
            restore_4bit_layout(self.get_base_layer())
        return super().get_base_weight()

    @torch.no_grad()
    def _apply_to_base(self, adapter_name: str, sign: int, safe_merge: bool = False) -> None:
        index = self.alps_index[adapter_name]
        if self.quantization_backend is not None:
            # Same contract as PEFT's LoRA on bnb layers: dequantize, add, re-quantize the whole weight.
            warnings.warn(
                f"{'Merging' if sign > 0 else 'Unmerging'} ALPS adapter {adapter_name!r} "
                f"{'into' if sign > 0 else 'from'} a {self.quantization_backend.backend_name} layer re-quantizes its "
                "weight, so outputs may differ slightly from the unmerged model due to rounding errors."
            )
        weight = self.get_base_weight()
        if weight.is_meta:
            raise ValueError(
                f"cannot {'merge' if sign > 0 else 'unmerge'} ALPS adapter {adapter_name!r}: the base weight is on "
                "the meta device (an empty model). Load the real base weights first."
            )
        if safe_merge or self.quantization_backend is not None:
            weight = weight.clone()
        delta = self.alps_delta[adapter_name].to(weight.dtype)
        if self.transposed:
            delta = delta.T
        weight.index_add_(self._stored_index(self.axis), index.to(weight.device), delta, alpha=sign)
        if safe_merge and not torch.isfinite(weight).all():
            raise broken_adapter_error(adapter_name, "NaNs or infs in its merged head slices")
        self.set_base_weight(weight)
        if adapter_name in self.alps_bias:
            bias = self.get_base_layer().bias
            bias.data.index_add_(0, index.to(bias.device), self.alps_bias[adapter_name].to(bias.dtype), alpha=sign)

    @torch.no_grad()
    def merged_slice_is_finite(self, adapter_name: str) -> bool:
        """Whether merging ``adapter_name`` would leave only finite values, computed on the slice alone."""
        if adapter_name not in self.alps_delta:
            return True
        index = self.alps_index[adapter_name]
        weight = self.get_base_weight()
        dim = self._stored_index(self.axis)
        delta = self.alps_delta[adapter_name].to(weight.dtype)
        merged = weight.index_select(dim, index.to(weight.device)) + (delta.T if self.transposed else delta)
        if not torch.isfinite(merged).all():
            return False
        if adapter_name in self.alps_bias:
            bias = self.get_base_layer().bias
            merged_bias = bias.index_select(0, index.to(bias.device)) + self.alps_bias[adapter_name].to(bias.dtype)
            return bool(torch.isfinite(merged_bias).all())
        return True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        for name in adapter_names:
            if name in self.alps_delta:
                self._apply_to_base(name, +1, safe_merge=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.alps_delta:
                self._apply_to_base(name, -1)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The full delta of one adapter in the base weight's storage orientation, so that ``weight + delta`` is the
        merged weight: ``[out, in]``, or ``[in, out]`` for a transposed (``Conv1D``) base. This is the contract of
        LoRA's ``get_delta_weight`` and what ``peft.convert_to_lora`` expects. For inspection and export only; the
        forward pass never builds it."""
        delta = self.alps_delta[adapter_name]
        full = delta.new_zeros(self.out_features, self.in_features)
        dim = 0 if self.axis == "out" else 1
        full = full.index_add(dim, self.alps_index[adapter_name].to(delta.device), delta)
        return full.T if self.transposed else full

    def get_delta_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        if adapter_name not in self.alps_bias:
            return None
        bias = self.alps_bias[adapter_name]
        return bias.new_zeros(self.out_features).index_add(0, self.alps_index[adapter_name].to(bias.device), bias)

    # --------------------------------------------------------------------------------------------- forward

    def _add_delta(self, result: torch.Tensor, x: torch.Tensor, adapter_name: str) -> torch.Tensor:
        delta = self.alps_delta[adapter_name]
        index = self.alps_index[adapter_name]
        x = self._cast_input_dtype(x, delta.dtype)
        if self.axis == "out":
            update = F.linear(x, delta, self.alps_bias[adapter_name] if adapter_name in self.alps_bias else None)
            return result.index_add(-1, index, update.to(result.dtype))
        update = F.linear(x.index_select(-1, index), delta)
        return result + update.to(result.dtype)

    # ------------------------------------------------------------------------------ mixed-adapter batches

    def _check_forward_args(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """With ``adapter_names`` (one adapter name or ``"__base__"`` per row of ``x``), as LoRA checks it."""
        adapter_names = kwargs.get("adapter_names", None)
        if adapter_names is None:
            return
        if len(x) != len(adapter_names):
            raise ValueError(
                "Length of `adapter_names` should be the same as the number of inputs, but got "
                f"{len(adapter_names)} and {len(x)} respectively."
            )
        if self.merged:
            raise ValueError(
                "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
            )

    def _mixed_batch_forward(
        self, x: torch.Tensor, *args: Any, adapter_names: list[str], **kwargs: Any
    ) -> torch.Tensor:
        """Row ``i`` of the batch gets the delta of ``adapter_names[i]`` only (none for ``"__base__"`` or an adapter
        that has no heads in this layer). Each adapter's rows are gathered, given that adapter's head-slice update
        and scattered back: no full-size delta and no per-row weight is built."""
        result = self.base_layer(x, *args, **kwargs)
        for name in dict.fromkeys(adapter_names):  # first-appearance order: deterministic
            if name == "__base__" or name not in self.alps_delta:
                continue
            rows = torch.tensor([i for i, n in enumerate(adapter_names) if n == name], device=result.device)
            updated = self._add_delta(result.index_select(0, rows), x.index_select(0, rows.to(x.device)), name)
            result = result.index_copy(0, rows, updated)
        return result


class Linear(nn.Module, AlpsLayer):
    """ALPS around an ``nn.Linear`` (or ``Conv1D`` with ``transposed=True``, or a quantized linear)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        index: list[int],
        axis: Axis,
        transposed: bool = False,
        init_weights: bool = True,
        train_bias: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        AlpsLayer.__init__(self, base_layer, axis=axis, transposed=transposed, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, index, init_weights=init_weights, train_bias=train_bias)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch_forward(x, *args, adapter_names=adapter_names, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self.active_adapters:
            if name in self.alps_delta:
                result = self._add_delta(result, x, name)
        return result

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """``peft.convert_to_lora`` can hold the weight delta, never a bias delta: an adapter that trains bias deltas
        (``alps_bias=True``) is refused rather than converted without them."""
        return adapter_name not in self.alps_bias

    def _get_additive_delta(self, adapter_name: str = "default") -> torch.Tensor:
        # PEFT >= 0.22 reads the merged-minus-base weight here (``get_additive_delta``, for ``convert_to_lora``);
        # ALPS is additive, so it is the delta of ``get_delta_weight``.
        return self.get_delta_weight(adapter_name)

    def __repr__(self) -> str:
        return "alps." + super().__repr__()

    def extra_repr(self) -> str:
        return quantization_extra_repr(self)


def dispatch_linear(target: nn.Module) -> Optional[type]:
    """The ALPS layer class for ``target`` (or the base layer of a tuner wrapping it), ``None`` if unsupported.

    Mirrors PEFT's dispatch: plain ``nn.Linear``, and any quantized linear layer PEFT has a backend for
    (bitsandbytes ``Linear4bit``/``Linear8bitLt``, HQQ, torchao, GPTQ, ...), whose frozen base computes as usual.
    """
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, nn.Linear) or is_quantized_linear(base):
        return Linear
    if isinstance(base, Conv1D):  # GPT-2 style, weight stored [in, out]
        return Linear
    return None
