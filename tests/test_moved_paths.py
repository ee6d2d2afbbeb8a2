"""The module paths before the stage folders still import for one release: the same module object, with one
DeprecationWarning naming the new path; every name peft_alps exported still imports from peft_alps."""

import importlib
import sys
import warnings

import pytest

import peft_alps
from peft_alps._moved import MOVED

# what `peft_alps.__all__` held before the move (0.1.0)
EXPORTED_BEFORE = ["AlpsConfig", "AlpsLayer", "AlpsModel", "HeadDims", "HeadLayout", "HeadScores", "export_to_lora",
                   "Linear", "Projection", "get_layout", "localize_heads", "modules_outside_attention", "paper_recipe",
                   "register_layout", "select_layer_consistent", "select_random", "save_mixed_adapters",
                   "supported_model_types", "warmup", "WarmupCheckpoint"]


@pytest.mark.parametrize("old, new", sorted(MOVED.items()))
def test_old_module_path_is_the_new_module_with_a_warning_naming_it(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to {new}") as record:
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert len([w for w in record if issubclass(w.category, DeprecationWarning) and old in str(w.message)]) == 1
    assert record[0].filename == __file__  # the warning points at the importing line, not at importlib


@pytest.mark.parametrize("old, new, name", [
    ("peft_alps.localization", "peft_alps.localization.pad", "METRICS"),
    ("peft_alps.warmup", "peft_alps.warmup.train", "OPTIMIZERS"),
    ("peft_alps.demo", "peft_alps.demo.toy", "DemoSettings"),
])
def test_folders_that_took_an_old_module_name_still_hand_on_its_names(old, new, name):
    folder = importlib.import_module(old)
    folder.__dict__.pop(name, None)
    with pytest.warns(DeprecationWarning, match=rf"{old}.{name} moved to {new}.{name}"):
        value = getattr(folder, name)
    assert value is getattr(importlib.import_module(new), name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert getattr(folder, name) is value  # once
    with pytest.raises(AttributeError, match=f"module '{old}' has no attribute 'no_such_name'"):
        folder.no_such_name


def test_every_name_peft_alps_exported_still_imports_from_peft_alps_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        for name in EXPORTED_BEFORE:
            assert getattr(peft_alps, name) is not None, name
    assert set(EXPORTED_BEFORE) <= set(peft_alps.__all__)
    assert callable(peft_alps.warmup) and callable(peft_alps.paper_recipe)  # the functions, not the folders/modules
    # importing an old path sets it as an attribute of the package: it must never name one of the package's own names
    assert not set(MOVED) & {f"peft_alps.{name}" for name in peft_alps.__all__}


def test_a_folders_own_module_imports_from_it_without_a_warning():
    import subprocess

    code = ("import warnings\nimport peft_alps\nwarnings.simplefilter('error', DeprecationWarning)\n"
            "from peft_alps.demo import synthetic, toy\nfrom peft_alps.warmup import data\n"
            "from peft_alps.localization import scorers\nprint(synthetic.__name__, data.__name__, scorers.__name__)")
    proc = subprocess.run([sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["peft_alps.demo.synthetic", "peft_alps.warmup.data", "peft_alps.localization.scorers"]
