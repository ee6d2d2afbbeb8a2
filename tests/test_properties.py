"""Property-based tests (hypothesis): the head-index mapping, and random merge/unmerge/add/delete sequences (issue 8).

Oracles are written here from the method text, independently of ``peft_alps.layouts``: a fused projection is
described row by row by who owns the row, and the KV group of query head ``h`` is ``floor(h * g / n)`` (the
paper's form) rather than the package's ``h // (n // g)``.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from peft import get_peft_model

from peft_alps import AlpsConfig, AlpsLayer
from peft_alps.layouts import HeadDims, head_parts, head_slice
from tests.support.tiny_models import tiny_llama

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------- head-index mapping


@st.composite
def geometries(draw):
    """MHA, GQA and MQA geometries with a non-empty set of query heads."""
    num_kv = draw(st.integers(1, 6))
    group = draw(st.integers(1, 5))
    dims = HeadDims(num_layers=1, num_heads=num_kv * group, num_kv_heads=num_kv, head_dim=draw(st.integers(1, 6)))
    heads = draw(st.sets(st.integers(0, dims.num_heads - 1), min_size=1))
    return dims, heads


def kv_of(h, n, g):
    return (h * g) // n


def owners(role, n, g, d):
    """Who owns each row (or, for ``o``, column) of a projection: ``("q", head)``, ``("k", group)``, ``("v", group)``."""
    if role == "q" or role == "o":
        return [("q", h) for h in range(n) for _ in range(d)]
    if role in ("k", "v"):
        return [(role, grp) for grp in range(g) for _ in range(d)]
    if role == "qkv":
        return owners("q", n, g, d) + owners("k", n, g, d) + owners("v", n, g, d)
    if role == "qkv_grouped":
        rows = []
        for grp in range(g):
            members = [h for h in range(n) if kv_of(h, n, g) == grp]
            for h in members:
                rows += [("q", h)] * d
            rows += [("k", grp)] * d + [("v", grp)] * d
        return rows
    raise AssertionError(role)


def oracle(role, dims, heads):
    n, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    wanted = {("q", h) for h in heads} | {(p, kv_of(h, n, g)) for h in heads for p in ("k", "v")}
    axis = "in" if role == "o" else "out"
    return axis, [i for i, owner in enumerate(owners(role, n, g, d)) if owner in wanted]


@settings(max_examples=30, **SETTINGS)
@given(geometries(), st.sampled_from(["q", "k", "v", "o", "qkv", "qkv_grouped"]))
def test_head_slice_matches_row_ownership_oracle(geometry, role):
    dims, heads = geometry
    assert head_slice(role, dims, heads) == oracle(role, dims, heads)
    assert head_slice(role, dims, sorted(heads, reverse=True) + sorted(heads)) == oracle(role, dims, heads)


@settings(max_examples=25, **SETTINGS)
@given(geometries(), st.sampled_from(["qkv", "qkv_grouped"]))
def test_head_parts_of_fused_projections(geometry, role):
    """Each head's q/k/v pieces are its own rows in the fused weight, and together they make up head_slice."""
    dims, heads = geometry
    n, g, d = dims.num_heads, dims.num_kv_heads, dims.head_dim
    table = owners(role, n, g, d)
    union = set()
    for h in heads:
        parts = head_parts(role, dims, h)
        assert [table[i] for i in parts["q"][1]] == [("q", h)] * d
        assert [table[i] for i in parts["k"][1]] == [("k", kv_of(h, n, g))] * d
        assert [table[i] for i in parts["v"][1]] == [("v", kv_of(h, n, g))] * d
        union |= {i for _, rows in parts.values() for i in rows}
    assert sorted(union) == head_slice(role, dims, heads)[1]


# ----------------------------------------------------------------------------- adapter operation sequences

N_HEADS, N_KV, HEAD_DIM, HIDDEN, LAYERS = 4, 2, 8, 32, 2
PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")


def allowed_slices(target_heads, targets):
    """{(layer, proj): (axis_dim, set of indices)} that an adapter may change, from the method text."""
    out = {}
    for layer, heads in target_heads.items():
        q = {h * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)}
        kv = {kv_of(h, N_HEADS, N_KV) * HEAD_DIM + i for h in heads for i in range(HEAD_DIM)}
        per = {"q_proj": (0, q), "k_proj": (0, kv), "v_proj": (0, kv), "o_proj": (1, q)}
        for proj in targets:
            out[(layer, proj)] = per[proj]
    return out


def formula_trainable(target_heads, targets):
    total = 0
    for heads in target_heads.values():
        groups = len({kv_of(h, N_HEADS, N_KV) for h in heads})
        sizes = {"q_proj": len(heads), "k_proj": groups, "v_proj": groups, "o_proj": len(heads)}
        total += sum(sizes[p] * HEAD_DIM * HIDDEN for p in targets)
    return total


selections = st.dictionaries(
    st.integers(0, LAYERS - 1), st.sets(st.integers(0, N_HEADS - 1), min_size=1).map(sorted), min_size=1
)
target_sets = st.sets(st.sampled_from(PROJS), min_size=1).map(sorted)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("add"), selections, target_sets),
        st.tuples(st.just("set"), st.integers(0, 7)),
        st.tuples(st.just("merge")),
        st.tuples(st.just("unmerge")),
        st.tuples(st.just("delete"), st.integers(0, 7)),
    ),
    min_size=1,
    max_size=7,
)


def base_weights(model):
    """Current base weight of every attention projection (through ALPS wrappers), as [out, in]."""
    out = {}
    for layer in range(LAYERS):
        attn = model.base_model.model.model.layers[layer].self_attn
        for proj in PROJS:
            module = getattr(attn, proj)
            base = module.get_base_layer() if isinstance(module, AlpsLayer) else module
            out[(layer, proj)] = base.weight.detach().clone()
    return out


def full_delta(model, name, layer, proj):
    module = getattr(model.base_model.model.model.layers[layer].self_attn, proj)
    if isinstance(module, AlpsLayer) and name in module.alps_delta:
        return module.get_delta_weight(name).detach()
    return None


@settings(max_examples=20, **SETTINGS)
@given(first=st.tuples(selections, target_sets), ops=operations)
@example(  # every operation at least once, whatever hypothesis draws
    first=({0: [0, 3], 1: [2]}, list(PROJS)),
    ops=[("add", {1: [1, 2]}, ["q_proj", "o_proj"]), ("set", 1), ("merge",), ("unmerge",), ("set", 0),
         ("merge",), ("unmerge",), ("delete", 0), ("merge",), ("unmerge",)],
)
def test_random_adapter_sequences_keep_the_invariants(first, ops):
    torch.manual_seed(0)
    base = tiny_llama(num_heads=N_HEADS, num_kv_heads=N_KV, head_dim=HEAD_DIM, layers=LAYERS, hidden_size=HIDDEN)
    untouched = {k: v.detach().clone() for k, v in base.state_dict().items() if ".self_attn." not in k}
    model = get_peft_model(base, AlpsConfig(target_heads=first[0], target_modules=first[1], init_weights=False))
    w0 = base_weights(model)
    adapters = {"default": first}
    history = dict(adapters)  # every adapter ever added (deleted ones too)
    merged: list[str] = []
    ever_merged: set[str] = set()  # their slices may differ from W0 by float round-off after an unmerge
    counter = 0
    x = torch.randint(0, 97, (1, 6))

    for op in ops:
        kind = op[0]
        if kind == "add" and not merged:  # (adding while merged is not a supported PEFT operation)
            counter += 1
            name = f"a{counter}"
            model.add_adapter(name, AlpsConfig(target_heads=op[1], target_modules=op[2], init_weights=False))
            adapters[name] = history[name] = (op[1], op[2])
        elif kind == "set" and not merged:
            model.set_adapter(sorted(adapters)[op[1] % len(adapters)])
        elif kind == "merge" and adapters and not merged:
            with torch.no_grad():
                before = model(x).logits
            model.merge_adapter()
            merged = list(model.active_adapters)
            ever_merged |= set(merged)
            with torch.no_grad():
                torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)
        elif kind == "unmerge" and merged:
            model.unmerge_adapter()
            merged = []
            for key, w in base_weights(model).items():
                torch.testing.assert_close(w, w0[key], rtol=0, atol=1e-6)  # unmerge(merge(W)) == W
        elif kind == "delete" and len(adapters) > 1 and not merged:
            name = sorted(adapters)[op[1] % len(adapters)]
            model.delete_adapter(name)
            del adapters[name]
            assert name not in model.peft_config
            assert not any(f".{name}" in n for n, _ in model.named_parameters())

        # --- invariants after every step
        current = base_weights(model)
        for (layer, proj), w in current.items():
            expected = w0[(layer, proj)].clone()
            for name in merged:
                delta = full_delta(model, name, layer, proj)
                if delta is not None:
                    expected += delta
            torch.testing.assert_close(w, expected, rtol=0, atol=1e-6)
            allowed = set()
            for name in ever_merged:
                heads, targets = history[name]
                dim, idx = allowed_slices(heads, targets).get((layer, proj), (0, set()))
                allowed |= {(dim, i) for i in idx}
            changed = (w != w0[(layer, proj)]).nonzero()  # exact: nothing outside merged slices moves at all
            for row, col in changed.tolist():
                assert (0, row) in allowed or (1, col) in allowed, f"layer {layer} {proj} changed at {(row, col)}"
        for key, value in model.base_model.model.state_dict().items():
            if key in untouched:
                assert torch.equal(value, untouched[key]), key
        active = model.active_adapters
        if len(active) == 1 and active[0] in adapters:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            assert trainable == formula_trainable(*adapters[active[0]])
