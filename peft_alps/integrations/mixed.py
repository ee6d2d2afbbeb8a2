"""ALPS inside PEFT's ``PeftMixedModel``: combine an ALPS adapter with LoRA (or LoHa, LoKr, OFT, ...).

``register_peft_method(..., is_mixed_compatible=True)`` is not enough in PEFT 0.21: ``peft/tuners/mixed/model.py``
admits adapter types through hard-coded module-level gates (``COMPATIBLE_TUNER_TYPES``, ``PREFIXES``, the
``Configs`` union, the ``Layers`` tuple) and routes each config to its tuner through an ``isinstance`` chain in
``MixedModel._create_and_replace``. Missing the gates is not always an error: without ``"alps_"`` in ``PREFIXES``
a new ALPS adapter stays frozen, and without ``AlpsLayer`` in ``Layers`` ``set_adapter(["lora"])`` leaves ALPS
running.

:func:`install` (run by ``import peft_alps``) therefore

1. checks every PEFT internal it relies on: each gate exists with the expected type, and each PEFT function that
   reads a gate still reads it (checked on the function's bytecode names);
2. adds ALPS to the gates (extending the tuples/list/union, never replacing PEFT's entries);
3. makes ``PeftMixedModel`` build :class:`AlpsMixedModel`, PEFT's ``MixedModel`` plus an ALPS branch in each
   per-config step (config defaults, validation, target matching, layer creation). Everything else (LoRA &
   co., forward, set_adapter, merge, delete) is PEFT's code.

The checks, not a version range, decide: a newer PEFT whose internals still look the same gets mixed support.
If a check fails, the integration switches off with one :class:`~peft_alps.integrations.compat.IntegrationUnavailableWarning`
naming the PEFT version and what changed; ``import peft_alps`` and every non-mixed feature keep working, and only
an ALPS adapter given to ``PeftMixedModel`` (``get_peft_model(..., mixed=True)``, ``add_adapter``,
``load_adapter``, ``from_pretrained``) raises :class:`MixedSupportError` with that reason.
``PEFT_ALPS_SKIP_MIXED=1`` switches the integration off on purpose (no warning; the same error when used).

``PeftMixedModel.save_pretrained`` is not implemented by PEFT; :func:`save_mixed_adapters` saves each adapter of
a mixed model as an ordinary PEFT adapter directory instead.
"""

from __future__ import annotations

import copy
import functools
import inspect
import os
import types
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

from torch import nn

from peft_alps.integrations import compat
from peft_alps.tuner.config import AlpsConfig
from peft_alps.tuner.layer import AlpsLayer
from peft_alps.tuner.model import AlpsModel, check_loaded_deltas
from peft_alps.tuner.registration import PREFIX, ensure_peft_type
from peft_alps.tuner.partial_backprop import install_partial_backprop, uninstall_partial_backprop
from peft_alps.tuner.stacked_names import canonical_key, canonical_module_names

SKIP_ENV = "PEFT_ALPS_SKIP_MIXED"
TESTED_PEFT = "0.21"  #: the PEFT minor release whose mixed-model internals these checks were written against
FEATURE = "ALPS in PeftMixedModel"


class MixedSupportError(RuntimeError):
    """PEFT's mixed-model internals are not what peft_alps was built against."""


# --------------------------------------------------------------------------------------------- verification


def _code_names(func: Any) -> set[str]:
    """Global/attribute names a function's bytecode refers to, nested code objects (comprehensions) included."""
    func = inspect.unwrap(getattr(func, "__func__", func))  # through our own refusal wrappers (functools.wraps)
    code = getattr(func, "__code__", None)
    names: set[str] = set()
    stack = [code] if code is not None else []
    while stack:
        code = stack.pop()
        names.update(code.co_names)
        stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
    return names


# (where, function, names it must read): the gates PEFT reads and the steps AlpsMixedModel overrides.
_GATE_READERS = (
    ("MixedModel", "_check_new_adapter_config", {"Configs"}),
    ("MixedModel", "set_adapter", {"Layers"}),
    ("MixedModel", "_mark_only_adapters_as_trainable", {"PREFIXES"}),
    ("MixedModel", "_replace_module", {"PREFIXES"}),
    ("MixedModel", "_unload_and_optionally_merge", {"PREFIXES"}),
    ("MixedModel", "delete_adapter", {"PREFIXES"}),
    ("BaseTuner", "inject_adapter", {
        "_prepare_adapter_config", "_prepare_model", "_check_target_module_exists", "_create_and_replace",
    }),
    ("PeftMixedModel", "__init__", {"MixedModel", "_check_config_compatible"}),
    ("PeftMixedModel", "add_adapter", {"_check_config_compatible"}),
    ("mixed_model", "_check_config_compatible", {"COMPATIBLE_TUNER_TYPES"}),
)


def check_internals() -> list[str]:
    """Everything that differs from the PEFT internals :func:`install` relies on (empty list: all as expected)."""
    if not _BASE_FOUND:
        return [f"peft's mixed-model module cannot be used ({_BASE_ERROR})"]
    try:
        import peft.mixed_model as mixed_model
        import peft.tuners.mixed as mixed_pkg
        import peft.tuners.mixed.model as mm
        from peft.mapping import PEFT_TYPE_TO_MIXED_MODEL_MAPPING
        from peft.tuners.tuners_utils import BaseTuner
    except ImportError as exc:
        return [f"a PEFT mixed-model module or name is gone ({exc})"]

    problems = []
    gates = {
        "COMPATIBLE_TUNER_TYPES": tuple,
        "PREFIXES": list,
        "Layers": tuple,
    }
    for name, kind in gates.items():
        if not isinstance(getattr(mm, name, None), kind):
            problems.append(f"peft.tuners.mixed.model.{name} is no longer a {kind.__name__}")
    if not isinstance(getattr(getattr(mm, "Configs", None), "__args__", None), tuple):
        problems.append("peft.tuners.mixed.model.Configs is no longer a typing.Union of config classes")
    if getattr(mixed_pkg, "COMPATIBLE_TUNER_TYPES", None) is not getattr(mm, "COMPATIBLE_TUNER_TYPES", None):
        problems.append("peft.tuners.mixed.COMPATIBLE_TUNER_TYPES is not re-exported from peft.tuners.mixed.model")
    original = getattr(mm, "MixedModel", None)
    if not (isinstance(original, type) and issubclass(original, BaseTuner)):
        problems.append("peft.tuners.mixed.model.MixedModel is no longer a BaseTuner")
        return problems
    current = getattr(mixed_model, "MixedModel", None)
    if not (isinstance(current, type) and issubclass(current, original)):
        problems.append("peft.mixed_model.MixedModel is not peft.tuners.mixed.model.MixedModel")

    owners = {
        "MixedModel": original,
        "BaseTuner": BaseTuner,
        "PeftMixedModel": getattr(mixed_model, "PeftMixedModel", None),
        "mixed_model": mixed_model,
    }
    for owner, func_name, needed in _GATE_READERS:
        func = getattr(owners[owner], func_name, None)
        if func is None:
            problems.append(f"{owner}.{func_name} no longer exists")
            continue
        missing = needed - _code_names(func)
        if missing:
            problems.append(f"{owner}.{func_name} no longer uses {', '.join(sorted(missing))}")
    for step in ("_prepare_adapter_config", "_prepare_model", "_check_target_module_exists", "_create_and_replace"):
        if not callable(getattr(original, step, None)):
            problems.append(f"MixedModel.{step} no longer exists")
    if ensure_peft_type() not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING:
        problems.append("ALPS is not registered as mixed-compatible (PEFT_TYPE_TO_MIXED_MODEL_MAPPING)")
    return problems


# --------------------------------------------------------------------------------------------- the tuner

def _original_mixed_model() -> tuple[type, str]:
    """PEFT's MixedModel, or a placeholder and the reason (then :func:`install` switches the integration off)."""
    try:
        import peft.tuners.mixed.model as mm

        base = mm.MixedModel
    except (ImportError, AttributeError) as exc:
        return nn.Module, f"{type(exc).__name__}: {exc}"
    return (base, "") if isinstance(base, type) else (nn.Module, "MixedModel is not a class")


def _is_alps(config: Any) -> bool:
    return isinstance(config, AlpsConfig)


_Base, _BASE_ERROR = _original_mixed_model()
_BASE_FOUND = not _BASE_ERROR


class AlpsMixedModel(_Base):
    """PEFT's ``MixedModel`` with ALPS support: each per-config step of an ALPS adapter runs ``AlpsModel``'s code
    (head-layout defaults, validation before any module is replaced, head-aware matching, head-sliced layers);
    every other adapter type takes PEFT's own path unchanged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # As in AlpsModel: a checkpoint's ALPS deltas must fit the adapter they are loaded into.
        self.register_load_state_dict_pre_hook(check_loaded_deltas)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if _is_alps(self.peft_config.get(adapter_name)):
            install_partial_backprop(self.model)  # as in AlpsModel: no backward below the lowest trained layer

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if not any(_is_alps(config) for config in self.peft_config.values()):
            uninstall_partial_backprop(self.model)

    def _prepare_adapter_config(self, peft_config, model_config):
        if _is_alps(peft_config):
            return AlpsModel._prepare_adapter_config(self, peft_config, model_config)
        return _Base._prepare_adapter_config(peft_config, model_config)

    def _prepare_model(self, peft_config, model: nn.Module) -> None:
        if _is_alps(peft_config):
            # ``model`` is the PeftMixedModel when an adapter is added; ALPS validates module names (and a saved
            # adapter's tensor names) relative to the transformers model, as in a plain PeftModel.
            return AlpsModel._prepare_model(self, peft_config, self.model)
        return super()._prepare_model(peft_config, model)

    def _check_target_module_exists(self, peft_config, key: str):
        if _is_alps(peft_config):
            return AlpsModel._check_target_module_exists(self, peft_config, key)
        return _Base._check_target_module_exists(peft_config, key)

    def _create_and_replace(self, config, *args: Any, **kwargs: Any) -> None:
        if _is_alps(config):
            return AlpsModel._create_and_replace(self, config, *args, **kwargs)
        return super()._create_and_replace(config, *args, **kwargs)

    def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
        if merge and safe_merge and hasattr(self, "_check_safe_merge"):
            self._check_safe_merge(adapter_names)  # ALPS layers: check all before merging any
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        uninstall_partial_backprop(model)  # the plain model gets transformers' own input-grad behaviour back
        return model


# AlpsModel's own helpers (``_layout``, ...) that its methods above call on ``self``: borrowed as they are.
for _name, _attr in vars(AlpsModel).items():
    if (
        _name.startswith("_")
        and not _name.startswith("__")
        and not hasattr(_Base, _name)
        and isinstance(_attr, (types.FunctionType, staticmethod, classmethod))
    ):
        setattr(AlpsMixedModel, _name, _attr)
del _name, _attr


# --------------------------------------------------------------------------------------------- install


def _without_alps(items: Iterable[Any], cls_name: str) -> tuple:
    """Drop an earlier peft_alps class (e.g. before a module reload) so that the current one is added once."""
    return tuple(i for i in items if not (getattr(i, "__module__", "").startswith("peft_alps") and i.__name__ == cls_name))


def install() -> None:
    """Let ``PeftMixedModel`` hold ALPS adapters. Idempotent. If PEFT's internals changed (or ``PEFT_ALPS_SKIP_MIXED``
    is set) nothing is patched: the integration is switched off and ALPS adapters are refused when mixed."""
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        compat.switch_off(FEATURE, f"{SKIP_ENV}={os.environ[SKIP_ENV]} is set", "", warn=False)
        _refuse_alps_in_mixed_models()
        return
    problems = check_internals()
    if problems:
        compat.switch_off(
            FEATURE,
            "its internals changed: " + "; ".join(problems),
            "Everything else in peft_alps works; only an ALPS adapter in a PeftMixedModel (get_peft_model(..., "
            "mixed=True), add_adapter, load_adapter) raises. Please report this with your PEFT version.",
        )
        _refuse_alps_in_mixed_models()
        return
    import peft.mixed_model as mixed_model
    import peft.tuners.mixed as mixed_pkg
    import peft.tuners.mixed.model as mm

    peft_type = ensure_peft_type()
    if peft_type not in mm.COMPATIBLE_TUNER_TYPES:
        mm.COMPATIBLE_TUNER_TYPES = (*mm.COMPATIBLE_TUNER_TYPES, peft_type)
    mixed_pkg.COMPATIBLE_TUNER_TYPES = mm.COMPATIBLE_TUNER_TYPES
    if PREFIX not in mm.PREFIXES:
        mm.PREFIXES.append(PREFIX)
    configs = _without_alps(mm.Configs.__args__, "AlpsConfig")
    mm.Configs = Union[(*configs, AlpsConfig)]
    mm.Layers = (*_without_alps(mm.Layers, "AlpsLayer"), AlpsLayer)
    mixed_model.MixedModel = AlpsMixedModel
    compat.switch_on(FEATURE)


_REFUSING = "__peft_alps_refuses_alps__"


def _refuse_alps_in_mixed_models() -> None:
    """Make ``PeftMixedModel``'s entry points raise :class:`MixedSupportError` (with the reason) for ALPS configs,
    instead of PEFT's bare "not compatible" or, worse, a half-working model. Other adapter types are untouched."""
    try:
        from peft.mixed_model import PeftMixedModel
    except ImportError:
        return  # no mixed models at all: nothing an ALPS adapter could be given to
    for name in ("__init__", "add_adapter"):
        original = getattr(PeftMixedModel, name, None)
        if callable(original) and not getattr(original, _REFUSING, False):
            setattr(PeftMixedModel, name, _refusing(original))


def _refusing(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any):
        reason = compat.switched_off(FEATURE)
        if reason is not None and any(isinstance(a, AlpsConfig) for a in (*args, *kwargs.values())):
            raise MixedSupportError(
                f"ALPS adapters cannot be used in a PeftMixedModel on {compat.versions()}: {reason}. Use a plain "
                "PeftModel (get_peft_model without mixed=True; it holds several ALPS adapters), or the PEFT release "
                f"this peft_alps was tested with in mixed models (pip install 'peft=={TESTED_PEFT}.*')."
            )
        return method(self, *args, **kwargs)

    setattr(wrapper, _REFUSING, True)
    return wrapper


def is_installed() -> bool:
    try:
        import peft.mixed_model as mixed_model
    except ImportError:
        return False
    return getattr(mixed_model, "MixedModel", None) is AlpsMixedModel


# --------------------------------------------------------------------------------------------- saving


def save_mixed_adapters(
    model: nn.Module,
    save_directory: Union[str, os.PathLike],
    adapter_names: Optional[Iterable[str]] = None,
) -> dict[str, Path]:
    """Save each adapter of a ``PeftMixedModel`` as an ordinary PEFT adapter in ``save_directory/<adapter name>``.

    ``PeftMixedModel.save_pretrained`` raises ``NotImplementedError``; this writes, per adapter, the same
    ``adapter_config.json`` + ``adapter_model.safetensors`` that ``PeftModel.save_pretrained`` writes for a model
    holding only that adapter. A LoRA adapter saved this way loads with plain PEFT; an ALPS one with PEFT after
    ``import peft_alps``; both together with ``PeftMixedModel.from_pretrained`` + ``load_adapter``.

    Returns ``{adapter name: directory}``.
    """
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    configs = model.peft_config
    names = list(configs) if adapter_names is None else list(adapter_names)
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"adapter(s) {unknown} not found; this model has {sorted(configs)}")
    canonical = canonical_module_names(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model.base_model.model
    written = {}
    for name in names:
        state = get_peft_model_state_dict(model, adapter_name=name)
        state = {canonical_key(k, canonical): v.detach().contiguous().clone() for k, v in state.items()}
        out = Path(save_directory) / name
        out.mkdir(parents=True, exist_ok=True)
        save_file(state, str(out / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
        config = copy.deepcopy(configs[name])
        config.inference_mode = True
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(base, "name_or_path", None) or None
        auto_mapping = None
        if config.task_type is None:
            auto_mapping = {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}
        config.save_pretrained(str(out), auto_mapping_dict=auto_mapping)
        written[name] = out
    return written

