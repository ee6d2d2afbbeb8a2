"""Training-loop integration: autograd stops below the lowest trained layer, with gradient checkpointing too.

Without gradient checkpointing nothing needs doing. The embeddings and every layer below the lowest selected
head are frozen and unwrapped, so their outputs do not require grad and autograd records nothing there: no
weight gradient and no activation gradient is computed below that layer.

Gradient checkpointing is where that breaks. ``Trainer``, TRL's ``SFTTrainer`` and PEFT all call
``model.enable_input_require_grads()`` once checkpointing is on. The transformers version of that method makes
the *embedding output* require grad, because reentrant checkpointing (``use_reentrant=True``) only backpropagates
into a layer whose input requires grad. The price is a backward pass through every frozen layer below the
lowest trained one, for activation gradients that nobody uses.

An ALPS model replaces that method on the wrapped transformers model (:func:`install_partial_backprop`, called by
:class:`~peft_alps.AlpsModel`). It keeps transformers' contract, the embedding output requires grad, but re-roots
the graph at the first decoder layer: when nothing below that layer trains, the layer receives a detached copy of
its input, so autograd records nothing below it and nothing flows back into the embeddings. From there each
checkpointed layer decides for itself: a layer that holds a trainable parameter and is checkpointed reentrantly
makes its own (detached, hence leaf) input require grad just before the checkpoint runs. Layers above it then get
inputs that require grad anyway, frozen layers below it record nothing, and the non-reentrant checkpointing that
transformers uses by default needs no input gradient at all. Training something below the lowest head (another
adapter, ``modules_to_save``, the embeddings) simply moves the boundary down, or keeps the whole graph.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Optional

import torch
from torch import nn


def install_partial_backprop(model: nn.Module) -> None:
    """Give ``model`` (a transformers model) the layer-wise ``enable_input_require_grads`` described above.

    Idempotent. If input-grad hooks were already installed on the embeddings (``prepare_model_for_kbit_training``
    does so before the adapter exists), they are swapped for the layer-wise ones right away.
    """
    if not hasattr(type(model), "enable_input_require_grads") or not _checkpointed_layers(model):
        return  # not a transformers model with checkpointable layers: keep whatever it does
    if "enable_input_require_grads" not in vars(model):
        # A partial of a module-level function (not a bound method) so that the model still pickles.
        model.enable_input_require_grads = partial(_enable_layer_input_require_grads, model)
    if getattr(model, "_require_grads_hooks", None):
        model.enable_input_require_grads()


def uninstall_partial_backprop(model: nn.Module) -> None:
    """Undo :func:`install_partial_backprop` (after unloading the adapter), restoring transformers' behaviour."""
    if "enable_input_require_grads" not in vars(model):
        return
    del model.enable_input_require_grads
    if getattr(model, "_require_grads_hooks", None):
        model.disable_input_require_grads()
        model.enable_input_require_grads()


def _checkpointed_layers(model: nn.Module) -> list[nn.Module]:
    # transformers' checkpointable blocks (decoder layers) carry a `gradient_checkpointing` flag.
    return [m for m in model.modules() if m is not model and hasattr(type(m), "gradient_checkpointing")]


def _enable_layer_input_require_grads(self: nn.Module) -> None:
    """ALPS's ``enable_input_require_grads``: the embedding output requires grad (transformers' contract), the first
    layer re-roots the graph, and input grads are made only where reentrant checkpointing needs them."""
    self.disable_input_require_grads()  # drops embedding hooks and earlier layer hooks alike
    _drop_orphaned_embedding_hooks(self)
    layers = _checkpointed_layers(self)
    state = _EmbeddingMark()
    hooks = [self.get_input_embeddings().register_forward_hook(partial(_embedding_output_requires_grad, state))]
    hooks.append(layers[0].register_forward_pre_hook(
        partial(_reroot_first_layer_input, state, _modules_before(self, layers[0])), with_kwargs=True))
    hooks += [layer.register_forward_pre_hook(_layer_input_requires_grad, with_kwargs=True) for layer in layers]
    # Stored where transformers keeps its own hooks, so its `disable_input_require_grads` removes them too.
    self._require_grads_hooks = hooks
    self._require_grads_hook = hooks[0]


class _EmbeddingMark:
    """Whether the hidden states the first layer is about to see come from an embedding output that only requires
    grad because of ``enable_input_require_grads`` (and not, e.g., from ``inputs_embeds`` the caller wants grads of)."""

    def __init__(self) -> None:
        self.marked = False


def _embedding_output_requires_grad(state: _EmbeddingMark, module: nn.Module, args: tuple, output: Any) -> None:
    if isinstance(output, torch.Tensor) and output.is_floating_point() and not output.requires_grad:
        output.requires_grad_(True)
        state.marked = torch.is_grad_enabled()


def _modules_before(model: nn.Module, first_layer: nn.Module) -> list[nn.Module]:
    """Modules registered before the first decoder layer (embeddings, position embeddings, ...), whose own parameters
    are what can train below it. Ancestors of the layer come first too; their *direct* parameters are counted."""
    before = []
    for module in model.modules():
        if module is first_layer:
            break
        before.append(module)
    return before


def _reroot_first_layer_input(
    state: _EmbeddingMark, below: list[nn.Module], layer: nn.Module, args: tuple, kwargs: dict[str, Any]
) -> Optional[tuple[tuple, dict[str, Any]]]:
    marked, state.marked = state.marked, False
    if not (marked and torch.is_grad_enabled()):
        return None
    if any(p.requires_grad for module in below for p in module.parameters(recurse=False)):
        return None  # something below trains (embeddings, trainable tokens): keep the whole graph
    if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad:
        return (args[0].detach(), *args[1:]), kwargs
    hidden = kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.requires_grad:
        return args, {**kwargs, "hidden_states": hidden.detach()}
    return None


def _drop_orphaned_embedding_hooks(model: nn.Module) -> None:
    # Enabling twice (prepare_model_for_kbit_training does: once itself, once via gradient_checkpointing_enable)
    # leaves transformers' first embedding hook unreachable from `_require_grads_hooks`; PEFT's fallback hook is
    # never recorded at all. Both are recognisable by name.
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "__name__", "") in ("make_inputs_require_grads", "make_inputs_require_grad"):
                for hooks in (module._forward_hooks, module._forward_hooks_with_kwargs, module._forward_hooks_always_called):
                    hooks.pop(key, None)


def _is_reentrant(layer: nn.Module) -> bool:
    keywords = getattr(getattr(layer, "_gradient_checkpointing_func", None), "keywords", None) or {}
    # torch.utils.checkpoint treats a missing use_reentrant as True.
    return keywords.get("use_reentrant", True) is not False


def _layer_input_requires_grad(layer: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    # Module hooks run outside transformers' checkpoint (it wraps `forward`, not `__call__`), so marking the input
    # here is seen by the reentrant checkpoint function.
    if not (layer.training and torch.is_grad_enabled() and getattr(layer, "gradient_checkpointing", False)):
        return
    if not _is_reentrant(layer) or not any(p.requires_grad for p in layer.parameters()):
        return
    hidden = args[0] if args else kwargs.get("hidden_states")
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point() and not hidden.requires_grad:
        hidden.requires_grad_(True)  # no grad_fn (nothing below trains), so this is a leaf
