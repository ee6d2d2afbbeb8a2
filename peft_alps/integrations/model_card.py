"""Model cards for ALPS adapters: ``library_name: peft``, the ``alps`` tag, the base model, the selected heads.

Two places write an adapter's README.md, and neither knows about ALPS:

* ``PeftModel.save_pretrained`` (and the Trainer, at the end of training) call
  ``PeftModel.create_or_update_model_card``, which writes PEFT's card (library, base model, a few tags);
* ``PeftModel.push_to_hub`` is transformers' generic ``PushToHubMixin.push_to_hub``: it saves into a temp
  dir, then **overwrites** README.md with transformers' own card (``library_name: transformers``, no PEFT
  data, no heads) and uploads the folder with ``_upload_modified_files``.

:func:`install` (run when ``peft_alps`` is imported) wraps those two ``PeftModel`` methods. The wrappers call
the original first and then, only for models that hold an ALPS adapter, rewrite README.md with
:func:`update_model_card`: ``library_name: peft``, the ``alps`` tag (existing tags, e.g. from
``push_to_hub(tags=...)`` or a card already on the Hub, are kept), the base model, and a section that lists
the selected heads. Other PEFT methods are left exactly as PEFT writes them. :func:`install` first checks that the
methods it wraps are still there with the arguments and the call chain it expects. If a PEFT or transformers release
changed them, that hook is not installed and one :class:`~peft_alps.integrations.compat.IntegrationUnavailableWarning` says so:
``import peft_alps``, saving and pushing keep working, with the card PEFT / transformers write themselves.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from peft_alps.integrations import compat

TAG = "alps"
START = "<!-- peft-alps:heads:start -->"
END = "<!-- peft-alps:heads:end -->"
_WRAPPED = "__peft_alps_model_card__"


def alps_adapters(peft_model: Any) -> dict[str, Any]:
    """``{adapter name: AlpsConfig}`` of the ALPS adapters held by ``peft_model`` (empty for other methods)."""
    from peft_alps.tuner.config import AlpsConfig

    configs = getattr(peft_model, "peft_config", None) or {}
    return {name: cfg for name, cfg in configs.items() if isinstance(cfg, AlpsConfig)}


def base_model_name(peft_model: Any) -> str | None:
    """The base model's Hub id or path, as far as the model knows it (``None`` for a model built from a config)."""
    for cfg in alps_adapters(peft_model).values():
        if cfg.base_model_name_or_path:
            return cfg.base_model_name_or_path
    base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return name or None


def heads_summary(adapters: dict[str, Any]) -> str:
    """Markdown: for each ALPS adapter, how many heads of how many, in which layers, on which projections."""
    lines = ["## ALPS heads", ""]
    lines.append(
        "This adapter was trained with [ALPS](https://arxiv.org/abs/2505.18799) (Attention Localization and Pruning "
        "Strategy): only the attention heads listed below have trainable slices; every other weight is the base "
        "model's. Load it with `import peft_alps` before `PeftModel.from_pretrained` / `AutoPeftModelForCausalLM`."
    )
    for name, cfg in sorted(adapters.items()):
        heads = cfg.target_heads
        count = sum(len(h) for h in heads.values())
        layout = cfg.head_layout or {}
        lines.append("")
        lines.append(f"### Adapter `{name}`")
        lines.append("")
        if layout.get("num_layers") and layout.get("num_heads"):
            total = layout["num_layers"] * layout["num_heads"]
            lines.append(
                f"- **Selected heads:** {count} of {total} ({100 * count / total:.1f}%) in {len(heads)} of "
                f"{layout['num_layers']} layers"
            )
            lines.append(
                f"- **Attention geometry:** {layout.get('model_type')}, {layout['num_layers']} layers x "
                f"{layout['num_heads']} query heads, {layout.get('num_kv_heads')} KV heads, head_dim "
                f"{layout.get('head_dim')}"
            )
        else:
            lines.append(f"- **Selected heads:** {count} in {len(heads)} layers")
        targets = cfg.target_modules
        if targets is not None:
            shown = targets if isinstance(targets, str) else ", ".join(f"`{t}`" for t in sorted(targets))
            lines.append(f"- **Projections:** {shown}")
        lines.append("- **Heads per layer** (query-head indices, 0-based):")
        lines.extend(f"  - layer {layer}: {', '.join(map(str, hs))}" for layer, hs in sorted(heads.items()))
    return "\n".join(lines)


def update_model_card(peft_model: Any, readme_path: str) -> bool:
    """Rewrite ``readme_path`` for the ALPS adapters of ``peft_model``; returns ``False`` (file untouched) if the
    model holds none. Idempotent: the heads section is replaced between markers, tags are merged."""
    adapters = alps_adapters(peft_model)
    if not adapters:
        return False
    if os.path.exists(readme_path):
        card = ModelCard.load(readme_path)
    else:
        card = ModelCard.from_template(ModelCardData())
    card.data.library_name = "peft"
    base = base_model_name(peft_model)
    tags = [t for t in (card.data.tags or []) if t != "base_model:adapter:"]  # PEFT's tag for an unnamed base
    for tag in ("peft", TAG) + ((f"base_model:adapter:{base}",) if base else ()):
        if tag not in tags:
            tags.append(tag)
    card.data.tags = tags
    if base:
        card.data.base_model = base
    elif not card.data.base_model:
        card.data.base_model = None  # PEFT writes base_model: '' for unnamed bases, which the Hub rejects
    section = f"{START}\n{heads_summary(adapters)}\n{END}"
    text = card.text
    if START in text and END in text:
        head, _, rest = text.partition(START)
        _, _, tail = rest.partition(END)
        text = head + section + tail
    else:
        lines = text.splitlines()
        # after the card's title if it has one, else at the top
        at = next((i + 1 for i, line in enumerate(lines) if line.startswith("# ")), 0)
        text = "\n".join(lines[:at] + ["", section, ""] + lines[at:])
    card.text = text
    card.save(readme_path)
    return True


# ----------------------------------------------------------------------------------------- PEFT hooks


SAVE_FEATURE = "the ALPS model card on save_pretrained"
PUSH_FEATURE = "the ALPS model card on push_to_hub"


def hook_problems(peft_model_cls: type) -> dict[str, list[str]]:
    """What no longer looks the way the hooks assume, per hook (``SAVE_FEATURE`` / ``PUSH_FEATURE``)."""
    save, push = [], []
    create = getattr(peft_model_cls, "create_or_update_model_card", None)
    if not _takes(create, ["self", "output_dir"]):
        save.append("PeftModel.create_or_update_model_card(self, output_dir) is missing or changed")
    upload = getattr(peft_model_cls, "_upload_modified_files", None)
    if not _takes(upload, ["self", "working_dir"]):
        push.append("transformers' PushToHubMixin._upload_modified_files(self, working_dir, ...) is missing or changed")
    pusher = getattr(peft_model_cls, "push_to_hub", None)
    try:
        push_source = inspect.getsource(pusher) if pusher is not None else ""
    except (OSError, TypeError):
        push_source = None  # no source available (e.g. a zipped install): trust the signatures above
    if pusher is None or (push_source is not None and "_upload_modified_files" not in push_source):
        push.append("PeftModel.push_to_hub no longer uploads through _upload_modified_files")
    return {SAVE_FEATURE: save, PUSH_FEATURE: push + save}  # the push hook rewrites the card with PEFT's writer


def _takes(method: Any, leading: list[str]) -> bool:
    try:
        return method is not None and list(inspect.signature(method).parameters)[: len(leading)] == leading
    except (TypeError, ValueError):
        return False


def install() -> None:
    """Wrap ``PeftModel.create_or_update_model_card`` and ``PeftModel._upload_modified_files`` (once each); a hook
    whose PEFT/transformers internals changed is switched off with one warning instead."""
    from peft import PeftModel

    problems = hook_problems(PeftModel)
    consequences = {
        SAVE_FEATURE: "Saved ALPS adapters get PEFT's own card, without the ALPS tag and heads section.",
        PUSH_FEATURE: "Pushed ALPS adapters get transformers' generic card (save_pretrained still writes the ALPS "
                      "card when that hook is on).",
    }
    for feature, found in problems.items():
        if found:
            compat.switch_off(feature, "; ".join(found), consequences[feature])
    original_create = PeftModel.create_or_update_model_card
    if not problems[SAVE_FEATURE] and not getattr(original_create, _WRAPPED, False):

        @functools.wraps(original_create)
        def create_or_update_model_card(self, output_dir: str, *args, **kwargs):
            result = original_create(self, output_dir, *args, **kwargs)
            update_model_card(self, os.path.join(output_dir, "README.md"))
            return result

        setattr(create_or_update_model_card, _WRAPPED, original_create)
        PeftModel.create_or_update_model_card = create_or_update_model_card

    original_upload = getattr(PeftModel, "_upload_modified_files", None)
    if not problems[PUSH_FEATURE] and not getattr(original_upload, _WRAPPED, False):
        peft_create = getattr(original_create, _WRAPPED, original_create)  # PEFT's own writer, not the wrapper

        @functools.wraps(original_upload)
        def _upload_modified_files(self, working_dir, *args, **kwargs):
            # transformers' push_to_hub has just replaced README.md with its own card: put the PEFT + ALPS data back.
            readme = os.path.join(working_dir, "README.md")
            if alps_adapters(self) and os.path.exists(readme):
                kept = list(ModelCard.load(readme).data.tags or [])
                peft_create(self, working_dir)  # PEFT's own fields (it resets the tags, so they are merged back)
                card = ModelCard.load(readme)
                card.data.tags = kept + [t for t in (card.data.tags or []) if t not in kept]
                card.save(readme)
                update_model_card(self, readme)
            return original_upload(self, working_dir, *args, **kwargs)

        setattr(_upload_modified_files, _WRAPPED, True)
        PeftModel._upload_modified_files = _upload_modified_files
