"""The module paths of peft-alps 0.x before the stage folders: each still imports, for one release, as the module it
moved to (the same object: every name, private ones too), with one ``DeprecationWarning`` that names the new path.

``import peft_alps.checkpoints`` -> ``peft_alps.localization.sources.open`` and so on (``MOVED``). Three old modules
gave their name to a stage folder (``peft_alps.localization``, ``peft_alps.warmup``, ``peft_alps.demo``): those folders
hand on the old module's names themselves (:func:`forward_old_names`). ``peft_alps.paper_recipe`` is not here: it names
the function (importing a module of that name would replace it on the package); the module is
``peft_alps.tuner.paper_recipe``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable
from typing import Any

MOVED = {
    "peft_alps.adapted_weights": "peft_alps.localization.sources.adapted_weights",
    "peft_alps.attention_cache": "peft_alps.localization.sources.hub_cache",
    "peft_alps.batches": "peft_alps.tuner.mixed_batches",
    "peft_alps.checkpoints": "peft_alps.localization.sources.open",
    "peft_alps.compat": "peft_alps.integrations.compat",
    "peft_alps.config": "peft_alps.tuner.config",
    "peft_alps.date_task": "peft_alps.demo.date_task",
    "peft_alps.export": "peft_alps.tuner.export",
    "peft_alps.hub_source": "peft_alps.localization.sources.hub",
    "peft_alps.hub_transfer": "peft_alps.localization.sources.hub_transfer",
    "peft_alps.layer": "peft_alps.tuner.layer",
    "peft_alps.mixed": "peft_alps.integrations.mixed",
    "peft_alps.model": "peft_alps.tuner.model",
    "peft_alps.model_card": "peft_alps.integrations.model_card",
    "peft_alps.models": "peft_alps.demo.builtin_models",
    "peft_alps.quantization": "peft_alps.tuner.quantization",
    "peft_alps.quiet": "peft_alps.integrations.quiet",
    "peft_alps.range_reader": "peft_alps.localization.sources.hub_ranges",
    "peft_alps.read_ahead": "peft_alps.localization.sources.hub_read_ahead",
    "peft_alps.real_demo": "peft_alps.demo.real",
    "peft_alps.registration": "peft_alps.tuner.registration",
    "peft_alps.resources": "peft_alps.demo.resources",
    "peft_alps.safe_loading": "peft_alps.tuner.safe_loading",
    "peft_alps.selectors": "peft_alps.localization.scorers",
    "peft_alps.sft_data": "peft_alps.warmup.data",
    "peft_alps.synthetic": "peft_alps.demo.synthetic",
    "peft_alps.training": "peft_alps.tuner.partial_backprop",
    "peft_alps.weighted": "peft_alps.tuner.weighted",
}


def _warn(old: str, new: str) -> None:
    """Warn at the first frame outside the import machinery and this file (the user's import line)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename == __file__ or "importlib" in frame.f_code.co_filename):
        # warnings does not count the import system's own frames (importlib._bootstrap*); it counts the rest
        level += not ("importlib" in frame.f_code.co_filename and "_bootstrap" in frame.f_code.co_filename)
        frame = frame.f_back
    warnings.warn(f"{old} moved to {new}; import it from there ({old} goes away in the next release)",
                  DeprecationWarning, stacklevel=level)


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec):
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module) -> None:  # the module it moved to is already executed
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(new))


def install() -> None:
    """Let the old flat module paths import (once per process)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())


def forward_old_names(old: str, new: str, namespace: dict[str, Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for a stage folder that took an old module's name: a name the folder does not define
    itself comes from ``new`` (the old module's new home), with one ``DeprecationWarning`` (it is then kept in the
    folder's ``namespace``)."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{old}.{name}") is not None:  # the folder's own module: no old name at all
            return importlib.import_module(f"{old}.{name}")
        module = importlib.import_module(new)
        try:
            value = getattr(module, name)
        except AttributeError:
            raise AttributeError(f"module {old!r} has no attribute {name!r}") from None
        _warn(f"{old}.{name}", f"{new}.{name}")
        namespace[name] = value
        return value

    return __getattr__
