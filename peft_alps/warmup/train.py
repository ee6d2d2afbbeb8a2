"""Attention warm-up: a cheap task model for localization when no fine-tuned sibling exists.

ALPS localizes heads by comparing a base model with a task model. When only the base and the task data are
at hand, :func:`warmup` makes the task model cheaply: it fine-tunes only the attention projections of the base
on a small budget (by default 10% of the data, one pass) and returns a :class:`WarmupCheckpoint` holding just
the changed attention tensors, under their usual checkpoint names, with the base's ``config.json``. Saved to a
folder, that checkpoint is a valid ``task`` for :func:`peft_alps.localize_heads` and ``peft-alps localize``.

Memory stays close to LoRA's:

- everything but the attention projections is frozen, so there are no gradients and no optimizer state for the
  MLPs, norms and embeddings;
- the trainable tensors are float32 *deltas* on top of the frozen attention weights (a ``torch.nn.utils.
  parametrize`` parametrization), so a bf16/fp16 base keeps its dtype and small updates are not rounded away;
- each delta takes its optimizer step inside the backward pass, as soon as its gradient is complete, and the
  gradient is freed at once: at most one attention tensor's gradient exists at a time;
- gradient checkpointing recomputes activations instead of keeping them;
- the default optimizer, transformers' Adafactor without a first moment, keeps only a row and a column vector
  per matrix (``optimizer="adamw"`` keeps two float32 moments per weight, ``"adamw8bit"`` two 8-bit ones).

The model passed in is left exactly as it was: weights, ``requires_grad`` flags, train/eval mode and gradient
checkpointing are all restored when the warm-up ends. With ``in_place=True`` (what ``peft-alps warmup`` uses,
since it loads a throwaway copy) float32 attention weights are trained directly instead, which saves the delta
buffers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from peft_alps.layouts import layout_for_config
from peft_alps.warmup.data import IGNORE_INDEX, DataError, collate, encode_record, fit_length

CHECKPOINT_FILE = "model.safetensors"
METADATA_FILE = "warmup.json"
FORMAT_VERSION = 1
ATTENTION_ROLES = ("q", "k", "v", "o")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")


# --------------------------------------------------------------------------------------------- result


@dataclass
class WarmupCheckpoint:
    """The outcome of a warm-up: the trained attention tensors, the base's config and what was done.

    ``tensors`` maps checkpoint tensor names (``model.layers.0.self_attn.q_proj.weight``, ...) to the warmed-up
    values (base + trained delta, float32). Once saved, the object is path-like, so it can be handed to
    ``localize_heads(base, task)`` directly.
    """

    tensors: dict[str, torch.Tensor]
    config: Any
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data (the safetensors file adds a small header)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def save(self, output_dir: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` (attention tensors only) and ``warmup.json``."""
        from safetensors.torch import save_file

        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(out / CHECKPOINT_FILE), {"format": "pt"})
        metadata = dict(self.metadata, checkpoint_bytes=(out / CHECKPOINT_FILE).stat().st_size)
        (out / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
        self.metadata, self.path = metadata, out
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> WarmupCheckpoint:
        from safetensors.torch import load_file
        from transformers import AutoConfig

        path = Path(path)
        if not (path / METADATA_FILE).is_file():
            raise OSError(f"{str(path)!r} is not a warm-up checkpoint: {METADATA_FILE} is missing")
        return cls(
            tensors=load_file(str(path / CHECKPOINT_FILE)),
            config=AutoConfig.from_pretrained(path),
            metadata=json.loads((path / METADATA_FILE).read_text()),
            path=path,
        )

    def __fspath__(self) -> str:
        if self.path is None:
            raise ValueError("this warm-up checkpoint is in memory only; call .save(folder) first, then use the folder")
        return str(self.path)


# --------------------------------------------------------------------------------------------- the delta


class _FrozenPlusDelta(nn.Module):
    """Parametrization ``weight = frozen + delta``: the delta is float32 whatever the frozen tensor's dtype."""

    def __init__(self, frozen: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(frozen.shape, dtype=dtype, device=frozen.device))

    def forward(self, frozen: torch.Tensor) -> torch.Tensor:
        if frozen.dtype == self.delta.dtype:
            return frozen + self.delta
        return (frozen.to(self.delta.dtype) + self.delta).to(frozen.dtype)


def check_projections(roles: Iterable[str]) -> set[str]:
    """``roles`` as a set, if it is a non-empty subset of :data:`ATTENTION_ROLES`; else a ``ValueError`` naming it."""
    roles = set(roles)
    if set(roles) - set(ATTENTION_ROLES) or not roles:
        raise ValueError(
            f"projections must be a non-empty subset of {ATTENTION_ROLES}, got {sorted(roles) or 'nothing'}"
        )
    return roles


def attention_modules(model: nn.Module, roles: Iterable[str] = ATTENTION_ROLES) -> dict[str, nn.Module]:
    """``{module name: module}`` of the attention projections of ``model`` whose role is in ``roles``.

    Found through the head-layout registry, so any registered family works. A fused ``qkv`` projection counts
    when any of q, k, v is asked for.
    """
    roles = check_projections(roles)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"warmup needs a transformers model with a config; got a {type(model).__name__}")
    layout, _ = layout_for_config(config)
    found = {}
    for name, module in model.named_modules():
        matched = layout.match(name)
        if matched is None:
            continue
        role = matched[1].role
        wanted = role in roles or (role in ("qkv", "qkv_grouped") and roles & {"q", "k", "v"})
        if wanted and isinstance(getattr(module, "weight", None), torch.Tensor):
            found[name] = module
    if not found:
        raise ValueError(
            f"no attention projections with roles {sorted(roles)} found in this {config.model_type} model "
            f"(layout paths: {layout.default_target_modules})"
        )
    return found


# --------------------------------------------------------------------------------------------- data


def _as_examples(train_dataset: Any, tokenizer: Any) -> list[dict[str, list[int]]]:
    """Normalize the accepted dataset forms to ``[{"input_ids", "labels"}]``."""
    if isinstance(train_dataset, (str, os.PathLike)):
        from peft_alps.warmup.data import load_jsonl_dataset

        return load_jsonl_dataset(train_dataset, tokenizer)
    examples = []
    for i, item in enumerate(train_dataset):
        where = f"train_dataset[{i}]"
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        if isinstance(item, str):
            item = {"text": item}
        elif hasattr(item, "tokens") and hasattr(item, "prompt_tokens"):  # peft_alps.demo.synthetic.Example
            prompt = len(item.prompt_tokens)
            item = {"input_ids": list(item.tokens), "labels": [IGNORE_INDEX] * prompt + list(item.tokens)[prompt:]}
        if isinstance(item, dict) or hasattr(item, "keys"):
            item = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in dict(item).items()}
            examples.append(encode_record(item, tokenizer, where))
        elif isinstance(item, Sequence):
            examples.append(encode_record({"input_ids": list(item)}, tokenizer, where))
        else:
            raise DataError(
                f"{where}: unsupported item of type {type(item).__name__}; expected a list of token ids, a 1-D "
                "tensor, a string (with tokenizer=) or a dict with input_ids / text / instruction+output"
            )
    if not examples:
        raise DataError("train_dataset is empty; the warm-up needs at least one example")
    return examples


def _check_lengths(examples: list[dict], limit: int | None, truncate: bool) -> list[dict]:
    return [fit_length(ex, limit, truncate, f"train_dataset[{i}]", "shorten it or pass truncate=True")
            for i, ex in enumerate(examples)]


def _collate(examples: list[dict], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in collate(examples, pad_id).items()}


def _batches(n_examples: int, batch_size: int, steps: int | None, fraction: float | None, seed: int):
    """Index batches: one pass over a ``fraction`` subset, or ``steps`` batches cycling over shuffled epochs."""
    g = torch.Generator().manual_seed(seed)
    if fraction is not None:
        subset = torch.randperm(n_examples, generator=g)[: math.ceil(fraction * n_examples)].tolist()
        return [subset[i : i + batch_size] for i in range(0, len(subset), batch_size)]
    out, order = [], []
    while len(out) < steps:
        if len(order) < batch_size:
            order += torch.randperm(n_examples, generator=g).tolist()
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


# --------------------------------------------------------------------------------------------- warm-up


def _make_optimizer(name: str, params: list[nn.Parameter], lr: float, weight_decay: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    if name == "adafactor":  # factored second moment, no first moment: O(rows + columns) state per matrix
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, beta1=None, weight_decay=weight_decay, scale_parameter=False,
                         relative_step=False, warmup_init=False)
    try:
        import bitsandbytes as bnb
    except ImportError as err:  # pragma: no cover - bitsandbytes is a test dependency
        raise ImportError('optimizer="adamw8bit" needs bitsandbytes: pip install "peft-alps[bnb]"') from err
    return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)


def _schedule(total: int, warmup_ratio: float, min_lr_ratio: float):
    """Learning-rate factor per step: linear warm-up, then cosine to ``min_lr_ratio``. Unlike the usual
    transformers schedule, step 0 already trains (at ``1 / warmup steps``): a warm-up of a handful of steps must
    not spend one of them at lr 0."""
    warm = math.ceil(warmup_ratio * total)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress = (step - warm) / max(1, total - warm)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _checkpointing_on(model: nn.Module) -> bool:
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # transformers v5 renamed it
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_disable()


def warmup(
    model: nn.Module | str | os.PathLike,
    train_dataset: Any,
    *,
    steps: int | None = None,
    fraction: float | None = None,
    lr: float = 1e-4,
    batch_size: int = 8,
    projections: Sequence[str] = ATTENTION_ROLES,
    weight_decay: float = 0.0,
    warmup_ratio: float = 0.1,
    min_lr_ratio: float = 0.1,
    optimizer: str = "adafactor",
    gradient_checkpointing: bool = True,
    tokenizer: Any = None,
    max_length: int | None = None,
    truncate: bool = False,
    seed: int = 0,
    in_place: bool = False,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> WarmupCheckpoint:
    """Fine-tune only the attention projections of ``model`` briefly; return the changed attention tensors.

    Args:
        model: a transformers causal LM (left unchanged), or a checkpoint folder to load one from.
        train_dataset: a JSONL path (see :mod:`peft_alps.warmup.data`), or an iterable of token-id lists / 1-D
            tensors / dicts with ``input_ids`` (``labels`` optional) / strings or ``text`` / ``instruction``
            + ``output`` dicts (these need ``tokenizer``). A ``datasets.Dataset`` with those columns works too.
        steps: number of optimizer steps (cycling over the shuffled data). Exclusive with ``fraction``.
        fraction: train one pass over this random share of the examples, in (0, 1]. The default when neither
            is given is 0.1, the paper's cheap task model.
        lr: peak learning rate (linear warm-up over ``warmup_ratio`` of the steps, cosine to ``min_lr_ratio``).
        batch_size: examples per step.
        projections: attention roles to train, a subset of ``("q", "k", "v", "o")``.
        weight_decay: AdamW weight decay on the deltas (pulls towards the base, not towards zero).
        optimizer: ``"adafactor"`` (default: transformers' Adafactor with a fixed ``lr`` and no first moment, one
            row and one column vector of state per matrix), ``"adamw"`` (float32 moments, 8 bytes per weight) or
            ``"adamw8bit"`` (bitsandbytes, 2 bytes per weight). Adafactor keeps the warm-up's peak memory at or
            below LoRA's (``benchmarks/warmup_memory.py``), and its heads did as well as AdamW's on the toy
            benchmark (``benchmarks/warmup_overlap.py``).
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        tokenizer: needed only for text records.
        max_length: longest sequence accepted (default: ``config.max_position_embeddings``); longer examples
            are an error unless ``truncate=True``.
        seed: data order and subset.
        in_place: train float32/float64 attention weights of ``model`` directly instead of through deltas. Saves
            one attention-sized buffer, but ``model`` ends up warmed up (the returned tensors share its memory on
            the CPU). Half-precision weights are always trained through float32 deltas.
        output_dir: when given, the checkpoint is saved there (and ``.path`` set).
        progress: show a tqdm bar with the running loss.
    """
    fraction = _check_options(steps, fraction, lr, batch_size, optimizer, projections, warmup_ratio, min_lr_ratio)
    model, base_id = _load_model(model)
    modules = attention_modules(model, projections)  # validates the architecture before any data work
    config = model.config
    limit = max_length if max_length is not None else getattr(config.get_text_config(), "max_position_embeddings", None)
    examples = _check_lengths(_as_examples(train_dataset, tokenizer), limit, truncate)
    if not any(label != IGNORE_INDEX for ex in examples for label in ex["labels"][1:]):
        raise DataError("no example has a supervised token after the first position; nothing to learn from")
    batches = _batches(len(examples), batch_size, steps, fraction, seed)

    state = _ModelState(model)
    try:
        trained = _attach_trainable(model, modules, in_place)
        factor = _schedule(len(batches), warmup_ratio, min_lr_ratio)
        handles, schedulers = _optimizer_in_backward(trained, optimizer, lr, weight_decay, factor)
        state.hooks += handles
        if gradient_checkpointing and not state.checkpointing:
            _set_checkpointing(model, True)
        losses = _train(model, examples, batches, schedulers, lr, progress)
        tensors = _trained_tensors(modules, trained)
    finally:
        state.restore(modules, gradient_checkpointing)

    result = WarmupCheckpoint(tensors=tensors, config=config, metadata=_metadata(
        config, base_id, projections, tensors, examples, batches, losses, fraction=fraction, batch_size=batch_size,
        lr=lr, weight_decay=weight_decay, optimizer=optimizer, gradient_checkpointing=gradient_checkpointing,
        seed=seed, in_place=in_place))
    if output_dir is not None:
        result.save(output_dir)
    return result


def _check_options(steps, fraction, lr, batch_size, optimizer, projections, warmup_ratio, min_lr_ratio) -> float | None:
    """Every option checked before anything is loaded; returns ``fraction`` (0.1 when neither it nor ``steps``)."""
    if steps is not None and fraction is not None:
        raise ValueError("pass either steps or fraction, not both")
    if steps is None and fraction is None:
        fraction = 0.1
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if fraction is not None and not 0.0 < float(fraction) <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r} (0.1 trains on 10% of the examples)")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    check_projections(projections)
    if not 0.0 <= warmup_ratio < 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(
            f"warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]; got {warmup_ratio!r}, {min_lr_ratio!r}"
        )
    return fraction


def _load_model(model: nn.Module | str | os.PathLike) -> tuple[nn.Module, str | None]:
    """The model (loaded when a folder is given) and the identifier the checkpoint records as its base."""
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model, dtype="auto"), str(model)
    return model, getattr(model.config, "_name_or_path", None) or None


class _ModelState:
    """What the warm-up changes on the model, recorded so that :meth:`restore` leaves it as it was."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.training = model.training
        self.requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self.checkpointing = _checkpointing_on(model)
        self.hooks: list[Any] = []

    def restore(self, modules: dict[str, nn.Module], gradient_checkpointing: bool) -> None:
        for handle in self.hooks:
            handle.remove()
        for module in modules.values():
            for pname in list(getattr(module, "parametrizations", {}).keys()):
                parametrize.remove_parametrizations(module, pname, leave_parametrized=False)
        if gradient_checkpointing and not self.checkpointing:
            _set_checkpointing(self.model, False)
        for name, p in self.model.named_parameters():
            p.requires_grad_(self.requires_grad.get(name, p.requires_grad))
        self.model.train(self.training)


def _attach_trainable(model: nn.Module, modules: dict[str, nn.Module], in_place: bool) -> dict[str, nn.Parameter]:
    """Freeze the model, then make each attention weight/bias trainable: in place (float32/64, ``in_place``) or
    through a float32 delta parametrization. Returns checkpoint name -> the tensor the optimizer updates."""
    model.requires_grad_(False)
    trained: dict[str, nn.Parameter] = {}
    for mod_name, module in modules.items():
        for pname in ("weight", "bias"):
            tensor = getattr(module, pname, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            if in_place and tensor.dtype in (torch.float32, torch.float64):
                tensor.requires_grad_(True)  # train the weight itself: no delta, no copy
                trained[f"{mod_name}.{pname}"] = tensor
                continue
            dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
            parametrize.register_parametrization(module, pname, _FrozenPlusDelta(tensor, dtype))
            trained[f"{mod_name}.{pname}"] = getattr(module.parametrizations, pname)[0].delta
    return trained


def _optimizer_in_backward(trained: dict[str, nn.Parameter], optimizer: str, lr: float, weight_decay: float,
                           factor) -> tuple[list[Any], list[Any]]:
    """One optimizer per tensor, stepped inside backward as soon as its gradient is final (and the gradient freed
    at once); returns the hook handles and the learning-rate schedulers."""
    optimizers = {p: _make_optimizer(optimizer, [p], lr, weight_decay) for p in trained.values()}
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in optimizers.values()]

    def step_and_free(param: torch.Tensor) -> None:
        optimizers[param].step()
        optimizers[param].zero_grad(set_to_none=True)

    return [p.register_post_accumulate_grad_hook(step_and_free) for p in trained.values()], schedulers


def _train(model: nn.Module, examples: list[dict], batches: list, schedulers: list, lr: float,
           progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    config = model.config.get_text_config()
    pad_id = 0 if config.pad_token_id is None else config.pad_token_id
    device = next(model.parameters()).device
    model.train()
    losses: list[float] = []
    with tqdm(batches, desc="warm-up (attention only)", unit="step", disable=not progress) as bar:
        for indices in bar:
            loss = model(**_collate([examples[i] for i in indices], pad_id, device), use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"warm-up loss became {loss.item()} at step {len(losses) + 1}; lower lr (now {lr})"
                )
            loss.backward()  # the optimizers step inside it (_optimizer_in_backward)
            for scheduler in schedulers:
                scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return losses


def _trained_tensors(modules: dict[str, nn.Module], trained: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The warmed-up attention tensors on the CPU: base + delta, or the weight trained in place."""
    tensors = {}
    with torch.no_grad():
        for mod_name, module in modules.items():
            for pname in ("weight", "bias"):
                name = f"{mod_name}.{pname}"
                if name not in trained:
                    continue
                plist = getattr(getattr(module, "parametrizations", None), pname, None)
                if plist is None:  # trained in place
                    tensors[name] = trained[name].detach().cpu()
                else:
                    tensors[name] = (plist.original.to(plist[0].delta.dtype) + plist[0].delta).cpu()
    return tensors


def _metadata(config: Any, base_id: str | None, projections, tensors: dict[str, torch.Tensor], examples: list,
              batches: list, losses: list[float], **settings: Any) -> dict[str, Any]:
    _, dims = layout_for_config(config)
    return {
        "format": "peft-alps-warmup",
        "format_version": FORMAT_VERSION,
        "base_model": base_id,
        "model_type": config.get_text_config().model_type,
        "head_dims": dims.as_dict(),
        "projections": sorted(set(projections)),
        "tensors": sorted(tensors),
        "dtype": str(next(iter(tensors.values())).dtype).removeprefix("torch."),
        "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        "num_examples": len(examples),
        "examples_seen": sum(len(b) for b in batches),
        "steps": len(batches),
        "fraction": settings["fraction"],
        "batch_size": settings["batch_size"],
        "lr": settings["lr"],
        "weight_decay": settings["weight_decay"],
        "optimizer": settings["optimizer"],
        "gradient_checkpointing": settings["gradient_checkpointing"],
        "seed": settings["seed"],
        "in_place": settings["in_place"],
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses": [round(x, 5) for x in losses],
    }
