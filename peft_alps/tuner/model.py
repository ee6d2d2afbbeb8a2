"""``AlpsModel``: injects head-sliced ALPS layers into the attention projections of a transformers model."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _get_in_out_features,
    check_target_module_exists,
)
from peft.utils import get_quantization_kwargs
from torch import nn
from transformers.pytorch_utils import Conv1D

from peft_alps.tuner.mixed_batches import adapter_names_hooks
from peft_alps.tuner.config import AlpsConfig
from peft_alps.tuner.layer import AlpsLayer, broken_adapter_error, dispatch_linear
from peft_alps.layouts import HeadDims, HeadLayout, head_axis_size, head_slice, layout_for_config
from peft_alps.tuner.quantization import keep_cpu_4bit_trainable
from peft_alps.tuner.registration import PREFIX
from peft_alps.tuner.safe_loading import check_adapter_file, expected_tensors, resolve_weights_file
from peft_alps.tuner.partial_backprop import install_partial_backprop, uninstall_partial_backprop
from peft_alps.tuner.weighted import add_weighted_adapter


def _model_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "model_type"):
        raise ValueError(
            f"ALPS needs a transformers model with a config.model_type to find its attention heads; got a "
            f"{type(model).__name__}. For a custom model, give it a config and register its head layout with "
            "peft_alps.register_layout(...)."
        )
    return config


def validate_target_heads(target_heads: dict[int, list[int]], dims: HeadDims) -> None:
    """Raise a ``ValueError`` naming the first layer or head that does not exist in a model of ``dims``."""
    for layer, heads in target_heads.items():
        if layer >= dims.num_layers:
            raise ValueError(
                f"layer {layer} out of range: the model has {dims.num_layers} layers (0..{dims.num_layers - 1})"
            )
        for head in heads:
            if head >= dims.num_heads:
                raise ValueError(
                    f"head {head} out of range: layer {layer} has {dims.num_heads} query heads "
                    f"(0..{dims.num_heads - 1})"
                )


def check_module_fits_layout(key: str, module: nn.Module, layout: HeadLayout, dims: HeadDims, model_type: str) -> None:
    """Check a matched module against its layout entry before wrapping: the storage orientation (``Conv1D`` needs
    ``transposed=True``) and the size of the dimension that holds the heads. A wrong custom layout or ``dims``
    reader is reported here instead of training or merging the wrong slices."""
    base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
    _, projection = layout.match(key)
    is_conv1d = isinstance(base, Conv1D)
    if is_conv1d != projection.transposed:
        raise ValueError(
            f"module {key!r} is a {type(base).__name__} (weight stored {'[in, out]' if is_conv1d else '[out, in]'}) "
            f"but the {model_type} head layout has Projection({projection.path!r}, {projection.role!r}, "
            f"transposed={projection.transposed}); register it with transposed={is_conv1d}"
        )
    in_features, out_features = _get_in_out_features(base)
    axis, size = head_axis_size(projection.role, dims)
    actual = out_features if axis == "out" else in_features
    if actual is not None and actual != size:
        raise ValueError(
            f"module {key!r} has {actual} {'output' if axis == 'out' else 'input'} features, but the {model_type} "
            f"head layout expects {size} for a {projection.role!r} projection of {dims.num_heads} query heads, "
            f"{dims.num_kv_heads} KV heads and head_dim {dims.head_dim}; check the layout's role and its dims reader"
        )


def check_one_module_per_slot(layout: HeadLayout, keys: list[str], model_type: str) -> None:
    """Refuse two modules that claim the same (layer, projection), e.g. a multimodal model whose vision tower also
    has ``layers.N.self_attn.q_proj``: its heads have another geometry than the text model the layout describes."""
    owner: dict = {}
    for key in keys:
        slot = layout.match(key)
        if slot in owner:
            raise ValueError(
                f"modules {owner[slot]!r} and {key!r} both match layer {slot[0]}'s {slot[1].path} of the "
                f"{model_type} head layout; only one sub-model's attention can be targeted (a vision tower next to "
                "the language model?). Leave the other out, e.g. exclude_modules=r'.*vision_tower.*'."
            )
        owner[slot] = key


def head_layout_record(config: Any, dims: HeadDims) -> dict[str, Any]:
    return {"model_type": config.get_text_config().model_type, **dims.as_dict()}


def check_head_layout(recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse an adapter built for another attention geometry than the base it is being put on."""
    if not recorded:
        return
    diffs = [
        f"{key}: adapter {recorded[key]!r} vs base {current.get(key)!r}"
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if key in recorded and recorded[key] != current.get(key)
    ]
    if diffs:
        raise ValueError(
            f"this ALPS adapter was built for a {recorded.get('model_type')} model with a different head layout "
            f"({'; '.join(diffs)}). Load it onto the base model it was trained from."
        )


def check_head_scores_fit(selection: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Refuse heads picked from the scores of a model with another geometry: they would be in range often enough
    (fewer layers or heads) to train the wrong heads silently."""
    recorded = (selection or {}).get("head_dims") or {}
    diffs = [
        f"{key}: scores {recorded[key]!r} vs base {current.get(key)!r}"
        for key in ("num_layers", "num_heads", "num_kv_heads", "head_dim")
        if key in recorded and recorded[key] != current.get(key)
    ]
    if diffs:
        origin = selection.get("head_scores") or "a HeadScores object"
        raise ValueError(
            f"target_heads were selected from head scores of another model ({origin}; base "
            f"{selection.get('base')!r}, task {selection.get('task')!r}): {'; '.join(diffs)}. Localize the base model "
            "you are adapting (peft_alps.localize_heads(base, task) or `peft-alps localize`) and select from "
            "those scores."
        )


_SAVED_DELTA = re.compile(r"^(?P<module>.+)\.alps_(?P<kind>delta|bias)\.(?P<adapter>[^.]+)$")


def check_loaded_deltas(tuner: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook of :class:`AlpsModel`: saved deltas must fit the adapter they are loaded into.

    ``Trainer(resume_from_checkpoint=...)`` loads a checkpoint's weights into the adapter the model already has,
    without reading the checkpoint's ``adapter_config.json``. A checkpoint from another base model or another
    head selection would otherwise fail with a bare size mismatch, or worse, load partially in silence.
    """
    expected: dict[str, tuple[int, ...]] = {}
    for name, layer in tuner.named_modules():
        if isinstance(layer, AlpsLayer):
            for adapter, index in layer.alps_index.items():
                n = len(index)
                shape = (n, layer.in_features) if layer.axis == "out" else (layer.out_features, n)
                expected[f"{prefix}{name}.alps_delta.{adapter}"] = shape
                if adapter in layer.alps_bias:
                    expected[f"{prefix}{name}.alps_bias.{adapter}"] = (n,)
    own_adapters = {_SAVED_DELTA.match(key)["adapter"] for key in expected}
    saved: dict[str, dict[str, tuple[int, ...]]] = {}
    orphans = []  # PEFT leaves a saved key without adapter name when the model has no such parameter
    for key, value in state_dict.items():
        if not key.startswith(prefix) or not hasattr(value, "shape"):
            continue
        if key.endswith((".alps_delta", ".alps_bias")):
            orphans.append(key)
        elif (found := _SAVED_DELTA.match(key)) and found["adapter"] in own_adapters:
            saved.setdefault(found["adapter"], {})[key] = tuple(value.shape)
    if not saved and not orphans:
        return

    def where(key: str) -> str:
        module, _, kind = key.rpartition(".alps_")
        return f"{module[len(prefix):].removeprefix('model.')} ({kind.split('.')[0]})"

    adapters = sorted(saved) or ["being loaded"]
    for adapter in adapters:
        shapes = saved.get(adapter, {})
        mine = {key: shape for key, shape in expected.items() if key.endswith(f".{adapter}")}
        problems = [
            f"{where(key)}: saved {list(shape)}, this adapter has {list(mine[key])}"
            for key, shape in shapes.items()
            if key in mine and shape != mine[key]
        ]
        problems += [f"{where(key)}: saved, but this adapter trains no head there" for key in orphans]
        if shapes:
            problems += [f"{where(key)}: missing from the saved weights" for key in mine if key not in shapes]
        if problems:
            listed = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
            name = repr(adapter) if adapter in saved else adapter
            raise ValueError(
                f"the saved ALPS weights do not fit the adapter {name}; they come from another base model or another "
                f"head selection:\n  {listed}\nThe checkpoint's adapter_config.json records its target_heads and "
                "head_layout. Resume with the same base model and that config, e.g. "
                "get_peft_model(base, AlpsConfig.from_pretrained(checkpoint_dir)), or load it with "
                "PeftModel.from_pretrained(base, checkpoint_dir, is_trainable=True)."
            )


class AlpsModel(BaseTuner):
    """Creates an ALPS model: only the selected attention heads' slices of q/k/v/o are trainable.

    Example:

        ```py
        >>> import peft_alps
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, peft_alps.AlpsConfig(target_heads={0: [1, 5], 2: [0]}))
        >>> model.print_trainable_parameters()
        ```
    """

    prefix: str = PREFIX
    tuner_layer_cls = AlpsLayer
    target_module_mapping: dict[str, list[str]] = {}

    # ------------------------------------------------------------------------------------ preparation

    def _layout(self) -> tuple[HeadLayout, HeadDims]:
        return layout_for_config(_model_config(self.model))

    def _prepare_adapter_config(self, peft_config: AlpsConfig, model_config: dict) -> AlpsConfig:
        layout, _ = self._layout()
        if peft_config.target_modules is None:
            peft_config.target_modules = set(layout.default_target_modules)
        return peft_config

    def _prepare_model(self, peft_config: AlpsConfig, model: nn.Module) -> None:
        """Validate everything before the first module is replaced, so a bad config leaves the model untouched."""
        config = _model_config(model)
        layout, dims = layout_for_config(config)
        record = head_layout_record(config, dims)
        check_head_layout(peft_config.head_layout, record)
        check_head_scores_fit(peft_config.head_selection, record)
        validate_target_heads(peft_config.target_heads, dims)

        matched = []
        for key, module in model.named_modules():
            # Another tuner's wrapper (e.g. LoRA in a mixed model) is matched under its own name, like a plain
            # layer; what it wraps (``.base_layer``) is not a separate target.
            if ".base_layer" in key or not key:
                continue
            hit = check_target_module_exists(peft_config, key)
            if not hit or isinstance(hit, _ExcludedModule):
                continue
            if layout.match(key) is None:
                raise ValueError(
                    f"module {key!r} is not an attention projection: ALPS can only target "
                    f"{layout.default_target_modules} in {record['model_type']} models. "
                    f"Check target_modules={sorted(peft_config.target_modules)}."
                )
            if not isinstance(module, AlpsLayer) and dispatch_linear(module) is None:
                raise TypeError(
                    f"module {key!r} is a {type(module).__name__}, which ALPS cannot wrap: supported are nn.Linear, "
                    "transformers' Conv1D and quantized linear layers (bitsandbytes 4-bit/8-bit, HQQ, torchao, GPTQ)"
                )
            matched.append((key, module))
        if not matched:
            raise ValueError(
                f"target_modules={sorted(peft_config.target_modules) if not isinstance(peft_config.target_modules, str) else peft_config.target_modules!r} "
                f"matched no attention projection; valid ones are {layout.default_target_modules}"
            )
        check_one_module_per_slot(layout, [key for key, _ in matched], record["model_type"])
        for key, module in matched:
            check_module_fits_layout(key, module, layout, dims, record["model_type"])
        peft_config.head_layout = record
        self._check_saved_weights(peft_config, layout, dims, matched)
        # bitsandbytes' CPU inference repacking of 4-bit weights breaks gradients and merging; keep it off.
        keep_cpu_4bit_trainable(model)

    @staticmethod
    def _check_saved_weights(peft_config: AlpsConfig, layout: HeadLayout, dims: HeadDims, matched: list) -> None:
        """For a config read from a saved adapter, check its weights file before anything is injected."""
        source = getattr(peft_config, "_weights_source", None)
        if source is None:
            return
        expected = []
        for key, module in matched:
            layer_idx, projection = layout.match(key)
            if layer_idx not in peft_config.target_heads:
                continue
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            weight = getattr(base, "weight", None)
            if weight is not None and weight.is_meta and not hasattr(base, "_hf_hook"):
                raise ValueError(
                    f"the base weights of {key!r} are on the meta device (an empty model), so the saved ALPS "
                    "weights would be silently dropped. Load the base model with its real weights first, e.g. "
                    "AutoModelForCausalLM.from_pretrained(...) without init_empty_weights / device='meta'."
                )
            in_features, out_features = _get_in_out_features(base)
            axis, index = head_slice(projection.role, dims, peft_config.target_heads[layer_idx])
            has_bias = peft_config.alps_bias and getattr(base, "bias", None) is not None
            expected.append((key, in_features, out_features, axis, len(index), has_bias))
        check_adapter_file(resolve_weights_file(source), expected_tensors(expected))

    def _check_target_module_exists(self, peft_config: AlpsConfig, key: str):
        hit = check_target_module_exists(peft_config, key)
        if not hit or isinstance(hit, _ExcludedModule):
            return hit
        layout, _ = self._layout()
        found = layout.match(key)
        # Layers without selected heads are left alone: no wrapper, no autograd work.
        return found is not None and found[0] in peft_config.target_heads

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register_load_state_dict_pre_hook(check_loaded_deltas)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        # Gradient checkpointing must not pull autograd below the lowest trained layer (see training.py).
        install_partial_backprop(model)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete an adapter. Unlike LoRA's adapters, ALPS adapters usually cover different layers, so the new
        active adapter is chosen model-wide (the remaining active ones, else the first remaining by name) rather
        than from whichever wrapped layer PEFT visits first."""
        remaining_active = [name for name in self.active_adapters if name != adapter_name]
        super().delete_adapter(adapter_name)
        new_active = remaining_active or sorted(self.peft_config)[:1]
        if new_active:
            self.set_adapter(new_active)

    # ------------------------------------------------------------------------------------ mixed batches

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """``model(x, adapter_names=[...])`` / ``generate(..., adapter_names=[...])``: one adapter (or
        ``"__base__"``) per row of the batch, as with LoRA; see :mod:`peft_alps.tuner.mixed_batches`."""
        with adapter_names_hooks(self, **kwargs):
            yield

    # ------------------------------------------------------------------------------------ combining

    def add_weighted_adapter(
        self, adapters: list[str], weights: list[float], adapter_name: str, combination_type: str = "linear"
    ) -> None:
        """Add ``adapter_name``, an ALPS adapter equal to ``sum_i weights[i] * delta(adapters[i])``, exactly.

        It trains the union of the adapters' ``target_heads`` on the union of their ``target_modules``, so merging
        it gives ``W + sum_i w_i * dW_i``. Weights may be negative. As with LoRA, the new adapter is not made active
        (``set_adapter(adapter_name)``), and an existing ``adapter_name`` is left as it is. ``combination_type``
        exists for LoRA's signature: only ``"linear"`` is accepted, since head-slice deltas need no approximation.
        See :mod:`peft_alps.tuner.weighted`.
        """
        add_weighted_adapter(self, adapters, weights, adapter_name, combination_type=combination_type)

    # ------------------------------------------------------------------------------------ merging

    def _check_safe_merge(self, adapter_names: list[str] | None) -> None:
        """With ``safe_merge=True``, check every layer before the first one is merged, so that a broken adapter
        leaves the model as it was instead of half merged."""
        names = self.active_adapters if adapter_names is None else adapter_names
        for key, module in self.model.named_modules():
            if isinstance(module, AlpsLayer):
                for name in names:
                    if name not in module.merged_adapters and not module.merged_slice_is_finite(name):
                        raise broken_adapter_error(
                            name,
                            f"NaNs or infs in the merged weights of {key!r} (diverged training or a damaged file). "
                            "Nothing was merged.",
                        )

    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        if safe_merge:
            self._check_safe_merge(adapter_names)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ):
        if merge and safe_merge:
            self._check_safe_merge(adapter_names)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        uninstall_partial_backprop(model)  # the plain model gets transformers' own input-grad behaviour back
        return model

    # ------------------------------------------------------------------------------------ injection

    def _create_and_replace(
        self,
        peft_config: AlpsConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        layout, dims = self._layout()
        layer_idx, projection = layout.match(current_key)
        axis, index = head_slice(projection.role, dims, peft_config.target_heads[layer_idx])
        kwargs = {
            "index": index,
            "axis": axis,
            "transposed": projection.transposed,
            "init_weights": peft_config.init_weights,
            "train_bias": peft_config.alps_bias,
            **get_quantization_kwargs(self.model),
        }
        if isinstance(target, AlpsLayer):
            if target.axis != axis or target.transposed != projection.transposed:
                raise ValueError(f"{current_key}: inconsistent ALPS layout between adapters")
            target.update_layer(
                adapter_name, index, init_weights=peft_config.init_weights, train_bias=kwargs["train_bias"]
            )
            return
        layer_cls = dispatch_linear(target)
        if layer_cls is None:  # _prepare_model has already refused these; kept for direct callers
            raise TypeError(f"{current_key}: ALPS cannot wrap a {type(target).__name__}")
        new_module = layer_cls(target, adapter_name, **kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)
