"""Head-layout registry: where every attention head lives in every attention weight, per model family.

Both the adapter (which rows/columns a head-sliced delta covers) and the localization scorer (which
slices form a head's per-head matrix) read heads only through this module.

Orientation: all indices are given in PyTorch ``nn.Linear`` orientation, ``weight = [out_features,
in_features]``. A projection stored transposed (GPT-2 ``Conv1D``, ``weight = [in, out]``) says so with
``transposed=True``; callers flip the axis when they touch the stored tensor.

Projection roles:

``q`` / ``k`` / ``v``
    Separate projections. Head ``h`` of q owns output rows ``[h*d, (h+1)*d)``; KV group ``g`` of k/v
    owns rows ``[g*d, (g+1)*d)``.
``o``
    Output projection. Head ``h`` owns input columns ``[h*d, (h+1)*d)``.
``qkv``
    Fused, concatenated ``[q heads | k groups | v groups]`` along the output rows (Phi-3 ``qkv_proj``,
    GPT-2 ``c_attn``).
``qkv_grouped``
    Fused and interleaved per KV group: the rows form ``[g, n/g + 2, d]`` blocks, the ``n/g`` query heads
    of a group followed by its k and v head (Falcon-40B's ``new_decoder_architecture``; GPT-NeoX, BLOOM and
    Falcon-RW ``query_key_value`` and GPTBigCode's MHA ``c_attn`` are the case ``g = n``, ``[n, 3, d]``;
    Falcon-7B's and GPTBigCode's multi-query layouts are the case ``g = 1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

Role = Literal["q", "k", "v", "o", "qkv", "qkv_grouped"]
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "qkv", "qkv_grouped")


@dataclass(frozen=True)
class HeadDims:
    """Attention geometry of a model: everything needed to map heads to weight slices."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    @property
    def total_heads(self) -> int:
        return self.num_layers * self.num_heads

    def kv_group(self, head: int) -> int:
        """KV group used by query head ``head`` (0-based): ``h // (n / g)``."""
        return head // self.group_size

    def as_dict(self) -> dict[str, int]:
        return {
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
        }


@dataclass(frozen=True)
class Projection:
    """One attention weight: its path inside a layer block, its role and its storage orientation."""

    path: str
    role: Role
    transposed: bool = False

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"unknown projection role {self.role!r}; expected one of {ROLES}")


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads of one model family live.

    Args:
        model_types: transformers ``config.model_type`` values this layout serves.
        layers: name of the module list that holds the blocks (``layers`` for ``model.layers.3``, ``h`` for
            GPT-2's ``transformer.h.3``). Matching ignores whatever comes before it, so the same layout serves
            bare models, ``*ForCausalLM`` wrappers and checkpoint tensor names.
        projections: the attention weights inside one block.
        dims: reads :class:`HeadDims` from a transformers config (defaults to the Llama-style attribute names).
    """

    model_types: tuple[str, ...]
    layers: str
    projections: tuple[Projection, ...]
    dims: Callable[[Any], HeadDims] | None = None

    def __post_init__(self):
        paths = [p.path for p in self.projections]
        if len(set(paths)) != len(paths):
            raise ValueError(f"duplicate projection paths in layout: {paths}")
        pattern = r"(?:^|\.)" + re.escape(self.layers) + r"\.(\d+)\.(" + "|".join(map(re.escape, paths)) + r")$"
        object.__setattr__(self, "_pattern", re.compile(pattern))

    @property
    def default_target_modules(self) -> list[str]:
        return [p.path for p in self.projections]

    def head_dims(self, config: Any) -> HeadDims:
        config = _text_config(config)
        return (self.dims or llama_dims)(config)

    def match(self, key: str) -> tuple[int, Projection] | None:
        """``(layer index, projection)`` for a module name such as ``model.layers.3.self_attn.q_proj``."""
        found = self._pattern.search(key)
        if found is None:
            return None
        path = found.group(2)
        return int(found.group(1)), next(p for p in self.projections if p.path == path)

    def match_tensor(self, name: str) -> tuple[int, Projection, str] | None:
        """``(layer, projection, "weight"|"bias")`` for a checkpoint tensor name, else ``None``."""
        module, _, param = name.rpartition(".")
        if param not in ("weight", "bias"):
            return None
        found = self.match(module)
        return None if found is None else (*found, param)


def _text_config(config: Any) -> Any:
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def llama_dims(config: Any) -> HeadDims:
    """Llama-style config attributes (also Mistral, Qwen2/3, Gemma, Phi-3, ...)."""
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    return HeadDims(config.num_hidden_layers, num_heads, num_kv_heads, head_dim)


def _blocks(start: int, size: int, count: int = 1) -> list[int]:
    return list(range(start * size, (start + count) * size))


def head_slice(role: Role, dims: HeadDims, heads: Iterable[int]) -> tuple[Literal["out", "in"], list[int]]:
    """Indices (sorted, unique) that the given query heads own in a projection of ``role``.

    Returns ``("out", rows)`` for projections whose heads are output rows (q/k/v and the fused forms) and
    ``("in", columns)`` for the output projection, in ``[out, in]`` orientation.
    """
    heads = sorted(set(heads))
    d = dims.head_dim
    groups = sorted({dims.kv_group(h) for h in heads})
    if role == "q":
        return "out", [i for h in heads for i in _blocks(h, d)]
    if role in ("k", "v"):
        return "out", [i for g in groups for i in _blocks(g, d)]
    if role == "o":
        return "in", [i for h in heads for i in _blocks(h, d)]
    if role == "qkv":
        q_rows = dims.num_heads * d
        kv_rows = dims.num_kv_heads * d
        rows = [i for h in heads for i in _blocks(h, d)]
        rows += [q_rows + i for g in groups for i in _blocks(g, d)]
        rows += [q_rows + kv_rows + i for g in groups for i in _blocks(g, d)]
        return "out", sorted(rows)
    if role == "qkv_grouped":
        per_group = dims.group_size + 2
        rows = []
        for g in groups:
            base = g * per_group
            rows += [i for h in heads if dims.kv_group(h) == g for i in _blocks(base + h % dims.group_size, d)]
            rows += _blocks(base + dims.group_size, d, 2)  # the group's k and v heads
        return "out", sorted(rows)
    raise ValueError(f"unknown projection role {role!r}; expected one of {ROLES}")


def head_axis_size(role: Role, dims: HeadDims) -> tuple[Literal["out", "in"], int]:
    """The dimension (``[out, in]`` orientation) that holds the heads of a projection of ``role``, and its size."""
    n, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    sizes = {"q": n * d, "k": g * d, "v": g * d, "o": n * d, "qkv": (n + 2 * g) * d, "qkv_grouped": (n + 2 * g) * d}
    if role not in sizes:
        raise ValueError(f"unknown projection role {role!r}; expected one of {ROLES}")
    return ("in" if role == "o" else "out"), sizes[role]


def head_parts(role: Role, dims: HeadDims, head: int) -> dict[str, tuple[Literal["out", "in"], list[int]]]:
    """The q/k/v/o pieces of one query head inside a projection of ``role``: ``{"q": ("out", rows), ...}``.

    For fused projections this separates the head's q rows from its group's k and v rows, which the
    localization scorer needs to form ``Wq_h^T @ Wk_kv(h) @ Wv_kv(h)^T``.
    """
    d = dims.head_dim
    g = dims.kv_group(head)
    if role in ("q", "k", "v", "o"):
        return {role: head_slice(role, dims, [head])}
    if role == "qkv":
        q_rows, kv_rows = dims.num_heads * d, dims.num_kv_heads * d
        return {
            "q": ("out", _blocks(head, d)),
            "k": ("out", [q_rows + i for i in _blocks(g, d)]),
            "v": ("out", [q_rows + kv_rows + i for i in _blocks(g, d)]),
        }
    if role == "qkv_grouped":
        base = g * (dims.group_size + 2)
        return {
            "q": ("out", _blocks(base + head % dims.group_size, d)),
            "k": ("out", _blocks(base + dims.group_size, d)),
            "v": ("out", _blocks(base + dims.group_size + 1, d)),
        }
    raise ValueError(f"unknown projection role {role!r}; expected one of {ROLES}")


# --------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, HeadLayout] = {}


def register_layout(layout: HeadLayout, *, override: bool = False) -> HeadLayout:
    """Add a layout for one or more ``model_type`` values. Returns the layout, so it can decorate nothing else.

    Example::

        register_layout(HeadLayout(
            model_types=("my_model",),
            layers="blocks",
            projections=(Projection("attn.wq", "q"), Projection("attn.wk", "k"),
                         Projection("attn.wv", "v"), Projection("attn.wo", "o")),
        ))
    """
    for model_type in layout.model_types:
        if model_type in _REGISTRY and not override and _REGISTRY[model_type] != layout:
            raise ValueError(
                f"a head layout for model_type {model_type!r} is already registered; "
                "pass override=True to replace it"
            )
    for model_type in layout.model_types:
        _REGISTRY[model_type] = layout
    return layout


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_layout(model_type: str | None) -> HeadLayout:
    """The layout for ``model_type``, or a ``ValueError`` that lists the supported families."""
    layout = _REGISTRY.get(model_type or "")
    if layout is None:
        raise ValueError(
            f"ALPS has no head layout for model_type {model_type!r}. Supported model types: "
            f"{', '.join(supported_model_types())}. To add one, call "
            "peft_alps.register_layout(HeadLayout(model_types=(...), layers=..., projections=(...))) "
            "before get_peft_model (see 'Custom architectures' in docs/architectures.md)."
        )
    return layout


def layout_for_config(config: Any) -> tuple[HeadLayout, HeadDims]:
    """Layout and head geometry of a transformers config (composite configs use their text config)."""
    text_config = _text_config(config)
    layout = get_layout(getattr(text_config, "model_type", None) or getattr(config, "model_type", None))
    return layout, layout.head_dims(text_config)


# ------------------------------------------------------------------------------------ config readers
# Each reader mirrors how the family's transformers attention module sizes its heads (transformers 5.x).


def mha_dims(config: Any) -> HeadDims:
    """Plain multi-head attention sized by ``hidden_size // num_attention_heads`` (OPT, BERT, GPT-NeoX)."""
    num_heads = config.num_attention_heads
    return HeadDims(config.num_hidden_layers, num_heads, num_heads, config.hidden_size // num_heads)


def gpt2_dims(config: Any) -> HeadDims:
    """GPT-2 names its sizes ``n_layer`` / ``n_head`` / ``n_embd``; attention is MHA."""
    return HeadDims(config.n_layer, config.n_head, config.n_head, config.n_embd // config.n_head)


def bloom_dims(config: Any) -> HeadDims:
    """BLOOM: ``n_layer`` / ``n_head`` with ``hidden_size``; MHA."""
    return HeadDims(config.n_layer, config.n_head, config.n_head, config.hidden_size // config.n_head)


def distilbert_dims(config: Any) -> HeadDims:
    """DistilBERT: ``n_layers`` / ``n_heads`` / ``dim``; MHA."""
    return HeadDims(config.n_layers, config.n_heads, config.n_heads, config.dim // config.n_heads)


def gpt_bigcode_dims(config: Any) -> HeadDims:
    """GPTBigCode (StarCoder): GPT-2 names; ``multi_query`` means one KV head (MQA), otherwise MHA."""
    kv_heads = 1 if config.multi_query else config.n_head
    return HeadDims(config.n_layer, config.n_head, kv_heads, config.n_embd // config.n_head)


def falcon_dims(config: Any) -> HeadDims:
    """Falcon's three attention layouts, as ``FalconAttention`` splits its fused ``query_key_value`` output:

    * ``new_decoder_architecture`` (Falcon-40B/180B): ``num_kv_heads`` groups of ``[n/g query heads | k | v]``;
    * ``multi_query`` (Falcon-7B): one group ``[all query heads | k | v]`` (MQA);
    * neither: MHA, interleaved per head as ``[q | k | v]`` (``num_kv_heads`` is not used by this layout).
    """
    num_heads = config.num_attention_heads
    if config.new_decoder_architecture:
        num_kv_heads = config.num_kv_heads or num_heads
    elif config.multi_query:
        num_kv_heads = 1
    else:
        num_kv_heads = num_heads
    return HeadDims(config.num_hidden_layers, num_heads, num_kv_heads, config.hidden_size // num_heads)


# ---------------------------------------------------------------------------------- built-in layouts


def _separate(attn: str, q="q_proj", k="k_proj", v="v_proj", o="o_proj") -> tuple[Projection, ...]:
    return (
        Projection(f"{attn}.{q}", "q"),
        Projection(f"{attn}.{k}", "k"),
        Projection(f"{attn}.{v}", "v"),
        Projection(f"{attn}.{o}", "o"),
    )


# Separate q/k/v/o Linear layers under ``model.layers.N.self_attn`` (MHA, GQA or MQA; head_dim read from the
# config where the family allows it to differ from hidden_size / num_heads, as in Gemma and Qwen3).
register_layout(
    HeadLayout(
        model_types=(
            "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "starcoder2",
        ),
        layers="layers",
        projections=_separate("self_attn"),
        dims=llama_dims,
    )
)

# Phi(-2): separate q/k/v, the output projection is ``self_attn.dense``.
register_layout(
    HeadLayout(
        model_types=("phi",),
        layers="layers",
        projections=_separate("self_attn", o="dense"),
        dims=llama_dims,
    )
)

# Phi-3: one fused ``qkv_proj`` = [q heads | k groups | v groups] along its output rows.
register_layout(
    HeadLayout(
        model_types=("phi3",),
        layers="layers",
        projections=(Projection("self_attn.qkv_proj", "qkv"), Projection("self_attn.o_proj", "o")),
        dims=llama_dims,
    )
)

# GPT-2: ``Conv1D`` layers store ``weight = [in, out]``; ``c_attn`` is [q | k | v] along the outputs.
# (``mlp.c_proj`` shares the leaf name, so the paths keep the ``attn.`` prefix.)
register_layout(
    HeadLayout(
        model_types=("gpt2",),
        layers="h",
        projections=(
            Projection("attn.c_attn", "qkv", transposed=True),
            Projection("attn.c_proj", "o", transposed=True),
        ),
        dims=gpt2_dims,
    )
)

# GPT-NeoX / Pythia: ``query_key_value`` viewed as [heads, 3, head_dim], i.e. [q|k|v] per head.
register_layout(
    HeadLayout(
        model_types=("gpt_neox",),
        layers="layers",
        projections=(
            Projection("attention.query_key_value", "qkv_grouped"),
            Projection("attention.dense", "o"),
        ),
        dims=mha_dims,
    )
)

# BLOOM: ``query_key_value`` viewed as [heads, 3, head_dim], like GPT-NeoX.
register_layout(
    HeadLayout(
        model_types=("bloom",),
        layers="h",
        projections=(
            Projection("self_attention.query_key_value", "qkv_grouped"),
            Projection("self_attention.dense", "o"),
        ),
        dims=bloom_dims,
    )
)

# GPTBigCode / StarCoder: an ``nn.Linear`` ``c_attn``. With ``multi_query`` it is [q heads | k | v] (one group);
# otherwise it is viewed as [heads, 3 * head_dim], i.e. [q|k|v] per head. Both are ``qkv_grouped``.
register_layout(
    HeadLayout(
        model_types=("gpt_bigcode",),
        layers="h",
        projections=(Projection("attn.c_attn", "qkv_grouped"), Projection("attn.c_proj", "o")),
        dims=gpt_bigcode_dims,
    )
)

# Falcon: fused ``query_key_value`` grouped per KV group (see ``falcon_dims`` for its three geometries).
register_layout(
    HeadLayout(
        model_types=("falcon",),
        layers="h",
        projections=(
            Projection("self_attention.query_key_value", "qkv_grouped"),
            Projection("self_attention.dense", "o"),
        ),
        dims=falcon_dims,
    )
)

# OPT: separate projections, the output one is called ``out_proj``.
register_layout(
    HeadLayout(
        model_types=("opt",),
        layers="layers",
        projections=_separate("self_attn", o="out_proj"),
        dims=mha_dims,
    )
)

# BERT-style encoders: ``attention.self.{query,key,value}`` and ``attention.output.dense`` (the MLP's
# ``output.dense`` sits directly under the layer and is not matched).
register_layout(
    HeadLayout(
        model_types=("bert", "roberta"),
        layers="layer",
        projections=_separate("attention", q="self.query", k="self.key", v="self.value", o="output.dense"),
        dims=mha_dims,
    )
)

# DistilBERT: ``transformer.layer.N.attention.{q,k,v,out}_lin``.
register_layout(
    HeadLayout(
        model_types=("distilbert",),
        layers="layer",
        projections=_separate("attention", q="q_lin", k="k_lin", v="v_lin", o="out_lin"),
        dims=distilbert_dims,
    )
)
