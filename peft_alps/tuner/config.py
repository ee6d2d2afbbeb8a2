"""``AlpsConfig``: which attention heads to train, in PEFT's config format."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft.config import PeftConfig

from peft_alps.tuner.registration import ensure_peft_type

TargetHeads = Union[Mapping[int, Iterable[int]], Iterable[tuple[int, int]]]

#: Valid ``AlpsConfig.bias`` values, with PEFT's meaning (as for LoRA): the base model's own bias vectors, shared
#: by every adapter: ``"none"`` (default) trains none, ``"all"`` every bias of the model, ``"alps_only"`` the biases
#: of the projections ALPS wraps. The selected heads' own bias slices are ``alps_bias=True``.
BIAS_OPTIONS = ("none", "all", "alps_only")
#: The value ``bias`` took before ``alps_bias`` existed, for the heads' own bias slices; still read.
LEGACY_HEADS_BIAS = "heads"


def normalize_target_heads(target_heads: Any) -> dict[int, list[int]]:
    """``{layer: [heads]}`` or ``[(layer, head), ...]`` -> ``{layer: sorted unique heads}`` with int keys.

    JSON turns int keys into strings, so string keys that spell an integer are accepted. Negative, non-integer,
    duplicated and empty selections are rejected with a ``ValueError`` that names the bad value.
    """
    if target_heads is None:
        raise ValueError(
            "AlpsConfig needs heads to train: pass target_heads={layer: [head, ...]} or a list of (layer, head) "
            "pairs, or head_scores='heads.json' with ratio=... (see peft_alps.localize_heads)"
        )
    pairs: list[tuple[Any, Any]] = []
    if isinstance(target_heads, Mapping):
        for layer, heads in target_heads.items():
            if isinstance(heads, (str, bytes)) or not isinstance(heads, Iterable):
                raise ValueError(f"target_heads[{layer!r}] must be a list of head indices, got {heads!r}")
            heads = list(heads)
            if not heads:
                raise ValueError(
                    f"target_heads[{layer!r}] is empty: list at least one head for layer {layer!r} or drop the layer"
                )
            pairs.extend((layer, h) for h in heads)
    elif isinstance(target_heads, Iterable) and not isinstance(target_heads, (str, bytes)):
        for pair in target_heads:
            if isinstance(pair, (str, bytes)) or not isinstance(pair, Iterable) or len(pair := tuple(pair)) != 2:
                raise ValueError(f"target_heads entries must be (layer, head) pairs, got {pair!r}")
            pairs.append(pair)
    else:
        raise ValueError(
            f"target_heads must be {{layer: [heads]}} or a list of (layer, head) pairs, got {type(target_heads).__name__}"
        )
    if not pairs:
        raise ValueError("target_heads is empty: select at least one (layer, head)")

    result: dict[int, set[int]] = {}
    seen: set[tuple[int, int]] = set()
    for layer, head in pairs:
        layer_i, head_i = _as_index(layer, "layer"), _as_index(head, "head")
        if (layer_i, head_i) in seen:
            raise ValueError(f"head {head_i} of layer {layer_i} is selected twice in target_heads; list it once")
        seen.add((layer_i, head_i))
        result.setdefault(layer_i, set()).add(head_i)
    return {layer: sorted(heads) for layer, heads in sorted(result.items())}


def _resolve_bias(bias: Any, alps_bias: bool, saved: bool) -> tuple[str, bool]:
    """``(bias, alps_bias)`` from what a config was given or saved with.

    ``bias`` has PEFT's values. Two older forms are still read: a saved config without the field (it has a recorded
    ``head_layout``: those adapters trained the heads' bias slices wherever the base had a bias), and
    ``bias="heads"``, the value the heads' bias slices had before ``alps_bias``; both mean ``alps_bias=True``."""
    if bias is None:
        return "none", True if saved else bool(alps_bias)
    if bias == LEGACY_HEADS_BIAS:
        if not saved:
            warnings.warn("AlpsConfig(bias='heads') is now AlpsConfig(alps_bias=True): bias takes PEFT's values "
                          f"{list(BIAS_OPTIONS)}, for the base model's own biases", DeprecationWarning, stacklevel=4)
        return "none", True
    if bias not in BIAS_OPTIONS:
        raise ValueError(
            f"bias={bias!r} is not valid for ALPS; use one of {list(BIAS_OPTIONS)} (PEFT's meaning, as for LoRA: which "
            "of the base model's own biases train), and alps_bias=True to train the selected heads' bias slices"
        )
    return bias, bool(alps_bias)


def _as_index(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{what} index must be an integer, got {value!r}")
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{what} index must be an integer, got {value!r}") from None
    if hasattr(value, "__index__"):
        value = value.__index__()
    if not isinstance(value, int):
        raise ValueError(f"{what} index must be an integer, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} index {value} is negative: indices start at 0")
    return value


@dataclass
class AlpsConfig(PeftConfig):
    """Configuration of an ALPS adapter: head-sliced trainable deltas on the selected attention heads.

    Args:
        target_heads (`dict[int, list[int]]` or `list[tuple[int, int]]`):
            The heads to train, as ``{layer: [query-head indices]}`` or ``[(layer, head), ...]``. Head indices are
            query-head indices; with grouped-query attention a head trains the k/v rows of its KV group
            ``h // (num_heads // num_kv_heads)``.
        target_modules (`list[str]` or `str`, *optional*):
            Attention projections to adapt. Defaults to the model family's q, k, v and o projections (from the
            head-layout registry). Narrow it, e.g. to ``["q_proj", "k_proj", "v_proj"]`` as in the paper. Only
            attention projections known to the layout registry may be targeted.
        exclude_modules (`list[str]` or `str`, *optional*):
            Module names to leave alone, as in LoRA.
        bias (`str`):
            PEFT's meaning, as for LoRA: which of the base model's own bias vectors train, shared by every adapter.
            ``"none"`` (default): none. ``"all"``: every bias of the model. ``"alps_only"``: the biases of the
            projections ALPS wraps. Only one adapter of a model may have a bias other than ``"none"``.
        alps_bias (`bool`):
            Also train the selected heads' own bias slices (a per-adapter delta, like the weight slices) where the
            projection has a bias (q/k/v of Qwen2, GPT-2's fused ``c_attn``, ...). Default ``False``. vLLM and
            llama.cpp refuse LoRA biases, so an export of such an adapter does not serve there (``export_to_lora``
            warns). Configs saved as ``bias="heads"``, or before ``bias`` existed, load with ``alps_bias=True``.
        init_weights (`bool`):
            Start the deltas at zero (default), so that the adapted model equals the base model. ``False`` draws
            small random deltas; this is for tests only.
        modules_to_save (`list[str]`, *optional*):
            Extra modules to train fully and save, e.g. a classification head.
        head_layout (`dict`, *optional*):
            Filled in by PEFT when the adapter is created: the model type and attention geometry the adapter was
            built for. An adapter is refused on a base whose geometry differs.
        head_scores (`str` or `HeadScores`, *optional*):
            Instead of ``target_heads``: a head-scores JSON file (``peft-alps localize ... --output heads.json``) or
            a :class:`~peft_alps.HeadScores`. With ``ratio`` or ``k`` it is resolved at construction into
            ``target_heads = scores.top_k(ratio=ratio | k=k)``; ``head_scores`` is then cleared (the file is never
            needed again) and ``head_selection`` records where the heads came from.
        ratio (`float`, *optional*):
            With ``head_scores``: fraction of all heads to train, ``0 < ratio <= 1`` (paper default 0.1);
            ``K = ceil(ratio * total_heads)``.
        k (`int`, *optional*):
            With ``head_scores``: number of heads to train (instead of ``ratio``).
        head_selection (`dict`, *optional*):
            Filled in when ``head_scores`` is resolved: scores file, ratio/k, metric, variant, tau, base and task.
            Informational only.
    """

    target_heads: Optional[Any] = field(
        default=None,
        metadata={"help": "Heads to train: {layer: [query-head indices]} or a list of (layer, head) pairs."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Attention projections to adapt; defaults to the family's q/k/v/o projections."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules to exclude."}
    )
    bias: Optional[str] = field(
        default=None,
        metadata={"help": "PEFT's meaning: which base-model biases train, 'none' (default), 'all' or 'alps_only'."},
    )
    alps_bias: bool = field(
        default=False,
        metadata={"help": "Also train the selected heads' own bias slices where the projection has a bias (not "
                  "servable by vLLM/llama.cpp)."},
    )
    init_weights: bool = field(
        default=True, metadata={"help": "Zero-initialise the deltas (identity at init). False is for tests only."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules apart from the ALPS layers to train and save."}
    )
    head_layout: Optional[dict] = field(
        default=None,
        metadata={"help": "Model type and attention geometry the adapter was built for (filled in automatically)."},
    )

    head_scores: Optional[Any] = field(
        default=None,
        metadata={"help": "Head-scores JSON file (or HeadScores) to pick target_heads from, with ratio= or k=."},
    )
    ratio: Optional[float] = field(
        default=None, metadata={"help": "With head_scores: fraction of all heads to train, 0 < ratio <= 1."}
    )
    k: Optional[int] = field(default=None, metadata={"help": "With head_scores: number of heads to train."})
    head_selection: Optional[dict] = field(
        default=None, metadata={"help": "Where target_heads came from when head_scores was resolved (informational)."}
    )

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = ensure_peft_type()
        self._resolve_head_scores()
        self.target_heads = normalize_target_heads(self.target_heads)
        self.bias, self.alps_bias = _resolve_bias(self.bias, self.alps_bias, saved=self.head_layout is not None)
        if isinstance(self.target_modules, (list, tuple)):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, (list, tuple)):
            self.exclude_modules = set(self.exclude_modules)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """PEFT's loader, plus a note of where the config came from: when the adapter is injected, the weights
        file next to it is checked (safetensors only, complete, right shapes, finite) before any module is
        replaced; see :mod:`peft_alps.tuner.safe_loading`."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if isinstance(config, AlpsConfig):
            from peft_alps.tuner.safe_loading import AdapterSource

            hub_kwargs, _, _ = cls._split_kwargs(kwargs)
            config._weights_source = AdapterSource(str(pretrained_model_name_or_path), subfolder, dict(hub_kwargs))
        return config

    def _resolve_head_scores(self) -> None:
        if self.ratio is not None and self.k is not None:
            raise ValueError(f"pass ratio= or k=, not both (got ratio={self.ratio!r}, k={self.k!r})")
        if self.head_scores is None:
            # after resolution (e.g. a reloaded adapter_config.json) ratio/k stay as a record next to head_selection
            if (self.ratio is not None or self.k is not None) and self.head_selection is None:
                raise ValueError(
                    "ratio= / k= select heads from head scores: also pass head_scores='heads.json' "
                    "(from peft-alps localize) or a HeadScores"
                )
            return
        if self.target_heads is not None:
            raise ValueError("pass either target_heads or head_scores (with ratio= or k=), not both")
        if self.ratio is None and self.k is None:
            raise ValueError("head_scores needs ratio= (e.g. 0.1, the paper's default) or k= to choose how many heads")
        from peft_alps.scores import HeadScores

        scores = self.head_scores
        source = None
        if not isinstance(scores, HeadScores):
            source = str(scores)
            scores = HeadScores.load(scores)
        self.target_heads = scores.top_k(self.ratio, k=self.k)
        self.head_selection = {
            "head_scores": source,
            "ratio": self.ratio,
            "k": self.k,
            "num_heads": sum(len(h) for h in self.target_heads.values()),
            "metric": scores.metric,
            "variant": scores.variant,
            "tau": scores.tau,
            "base": scores.base,
            "task": scores.task,
            "head_dims": dict(scores.head_dims),
        }
        self.head_scores = None

    @property
    def num_selected_heads(self) -> int:
        return sum(len(heads) for heads in self.target_heads.values())

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        # JSON keys are strings; keep them as decimal layer indices so that a reload gives the same ints back.
        out["target_heads"] = {str(layer): list(heads) for layer, heads in self.target_heads.items()}
        return out
