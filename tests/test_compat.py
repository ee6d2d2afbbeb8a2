"""``import peft_alps`` never breaks: a PEFT/transformers internal that an optional integration builds on is missing
or changed, or PEFT is newer than any release we tested. Each case runs in a fresh interpreter, with the change made
before ``import peft_alps``: the core adapter still trains, saves and loads; the integration that lost its internal
is switched off with exactly one warning naming the versions and what changed, and raises only when used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCENARIO = textwrap.dedent('''
    import json, tempfile, warnings
    import torch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import peft_alps
    from peft import PeftModel, get_peft_model, LoraConfig
    from peft_alps import AlpsConfig
    from peft_alps.integrations import mixed
    from peft_alps.integrations.compat import IntegrationUnavailableWarning
    from tests.support.tiny_models import batch, tiny_llama, train_steps

    out = {"warnings": [str(w.message) for w in caught if issubclass(w.category, IntegrationUnavailableWarning)]}
    model = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1], 2: [3]}))
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    train_steps(model, steps=1)
    out["trained"] = all(not torch.equal(b, p) for b, p in zip(before, (p for p in model.parameters() if p.requires_grad)))
    x = batch()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        out["card_has_heads"] = "## ALPS heads" in open(tmp + "/README.md").read()
        loaded = PeftModel.from_pretrained(tiny_llama(), tmp)
        with torch.no_grad():
            out["reloaded_equal"] = torch.equal(model(x).logits, loaded(x).logits)
    out["mixed_installed"] = mixed.is_installed()
    lora = LoraConfig(target_modules=["q_proj"], r=2)
    try:
        get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}), mixed=True)
        out["mixed_alps"] = "ok"
    except Exception as exc:
        out["mixed_alps"] = f"{type(exc).__name__}: {exc}"
    try:
        joint = get_peft_model(tiny_llama(), lora, adapter_name="lora", mixed=True)
        joint.add_adapter("alps", AlpsConfig(target_heads={0: [1]}))
        out["mixed_add_alps"] = "ok"
    except Exception as exc:
        out["mixed_add_alps"] = f"{type(exc).__name__}: {exc}"
    print("RESULT" + json.dumps(out))
''')

PRELUDES = {
    "peft-mixed-internal-deleted": "import peft.tuners.mixed.model as mm; del mm.Layers",
    "transformers-upload-helper-deleted":
        "from transformers.utils.hub import PushToHubMixin; del PushToHubMixin._upload_modified_files",
    "newer-peft-version": "import peft; peft.__version__ = '0.99.0'",
}


def run_scenario(prelude: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("PEFT_ALPS_SKIP_MIXED", None)
    done = subprocess.run([sys.executable, "-c", prelude + "\n" + SCENARIO], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module", params=list(PRELUDES))
def scenario(request):
    return request.param, run_scenario(PRELUDES[request.param])


def test_core_trains_saves_and_loads(scenario):
    _, out = scenario
    assert out["trained"] and out["reloaded_equal"]


def test_each_break_switches_off_only_its_integration(scenario):
    import peft
    import transformers

    name, out = scenario
    versions = f"peft {peft.__version__}, transformers {transformers.__version__}"
    if name == "peft-mixed-internal-deleted":
        [warning] = out["warnings"]
        assert warning.startswith(f"peft_alps: ALPS in PeftMixedModel is switched off on {versions}: its internals "
                                  "changed: peft.tuners.mixed.model.Layers is no longer a tuple")
        assert not out["mixed_installed"] and out["card_has_heads"]
        assert out["mixed_alps"].startswith("MixedSupportError: ALPS adapters cannot be used in a PeftMixedModel on "
                                            f"{versions}: its internals changed: peft.tuners.mixed.model.Layers")
        # (PEFT's own mixed models need that gate too, so LoRA alone fails there: that is PEFT's code, not ours.)
    elif name == "transformers-upload-helper-deleted":
        [warning] = out["warnings"]
        assert warning.startswith(f"peft_alps: the ALPS model card on push_to_hub is switched off on {versions}: "
                                  "transformers' PushToHubMixin._upload_modified_files")
        assert out["card_has_heads"]  # the save_pretrained hook does not depend on that helper
        assert out["mixed_installed"] and out["mixed_add_alps"] == "ok"
    else:  # a newer PEFT with the same internals: everything stays on, nothing warns
        assert out["warnings"] == []
        assert out["mixed_installed"] and out["mixed_alps"] == "ok" and out["mixed_add_alps"] == "ok"
        assert out["card_has_heads"]


def test_skip_env_switches_mixed_support_off_without_a_warning(monkeypatch):
    from peft import get_peft_model

    from peft_alps import AlpsConfig
    from peft_alps.integrations import compat
    from peft_alps.integrations import mixed
    from tests.support.tiny_models import tiny_llama

    monkeypatch.setenv(mixed.SKIP_ENV, "1")
    mixed.install()
    try:
        with pytest.raises(mixed.MixedSupportError, match=r"PeftMixedModel on peft .*: PEFT_ALPS_SKIP_MIXED=1 is set"):
            get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}), mixed=True)
    finally:
        monkeypatch.delenv(mixed.SKIP_ENV)
        mixed.install()  # back on: the checks pass on the installed PEFT
    assert compat.switched_off(mixed.FEATURE) is None
    get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}), mixed=True)


def test_switched_off_mixed_support_refuses_alps_only_when_asked(monkeypatch, tmp_path):
    from peft import LoraConfig, PeftMixedModel, get_peft_model

    from peft_alps import AlpsConfig
    from peft_alps.integrations import compat
    from peft_alps.integrations import mixed
    from peft_alps.integrations.compat import IntegrationUnavailableWarning
    from tests.support.tiny_models import tiny_llama

    saved = get_peft_model(tiny_llama(), AlpsConfig(target_heads={0: [1]}))
    saved.save_pretrained(tmp_path / "alps")
    monkeypatch.setattr(mixed, "check_internals", lambda: ["peft.tuners.mixed.model.PREFIXES is no longer a list"])
    with pytest.warns(IntegrationUnavailableWarning) as caught:
        mixed.install()
        mixed.install()  # once per process
    assert len(caught) == 1 and "PREFIXES is no longer a list" in str(caught[0].message)
    try:
        joint = get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], r=2), adapter_name="lora",
                               mixed=True)  # other adapter types are untouched
        refusal = r"ALPS adapters cannot be used in a PeftMixedModel on peft .*: its internals changed: .*PREFIXES"
        with pytest.raises(mixed.MixedSupportError, match=refusal):
            joint.add_adapter("alps", AlpsConfig(target_heads={0: [1]}))
        with pytest.raises(mixed.MixedSupportError, match=refusal):
            joint.load_adapter(str(tmp_path / "alps"), adapter_name="alps")
        with pytest.raises(mixed.MixedSupportError, match=refusal):
            PeftMixedModel.from_pretrained(tiny_llama(), str(tmp_path / "alps"))
        assert list(joint.peft_config) == ["lora"]
    finally:
        monkeypatch.undo()
        mixed.install()
    assert compat.switched_off(mixed.FEATURE) is None
