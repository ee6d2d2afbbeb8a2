"""PEFT's own generic adapter tests (``PeftCommonTester`` from the installed PEFT's sdist), ALPS and LoRA side by side.

The test methods and the config kwargs they get mirror PEFT's ``tests/test_decoder_models.py`` (the methods that
apply to a method targeting linear layers of decoder models), on four tiny local model families. The only
ALPS-specific difference is pickled adapters: ALPS refuses to load ``adapter_model.bin`` (``torch.load`` runs
arbitrary code), which is documented policy, so those two tests are expected to fail for ALPS.
"""

from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile

import pytest
import torch
from peft import LoraConfig
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from peft_alps import AlpsConfig

from tests.support.peft_upstream import REQUIRE_ENV, SdistUnavailable, load_testing_common

_WORKDIR = tempfile.mkdtemp(prefix="peft-alps-peft-tests-")
atexit.register(shutil.rmtree, _WORKDIR, ignore_errors=True)
try:
    testing_common = load_testing_common(__import__("pathlib").Path(_WORKDIR))
except SdistUnavailable as exc:
    if os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        raise
    pytest.skip(f"PEFT's own tests are not available: {exc}", allow_module_level=True)
testing_utils = importlib.import_module("peft_upstream_tests.testing_utils")
set_init_weights_false = testing_utils.set_init_weights_false

# PEFT's harness assumes only a few methods handle GPT-2's Conv1D projections; ALPS does (transposed head slices).
_conv1d_skip = testing_common._skip_if_conv1d_not_supported


def _skip_if_conv1d_not_supported(model_id, config_cls, config_kwargs):
    if config_cls is not AlpsConfig:
        _conv1d_skip(model_id, config_cls, config_kwargs)


testing_common._skip_if_conv1d_not_supported = _skip_if_conv1d_not_supported

VOCAB = 64
FAMILIES = {
    "llama-gqa": lambda: LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    # PEFT's harness converts "qwen2" adapters to LoRA at rank 4 (tuned to its tiny-dummy-qwen2); with larger base
    # weights than the default init the rank-8 LoRA's effect is small enough for that rank.
    "qwen2": lambda: Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                 initializer_range=0.1),
    "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64),
    "mistral": lambda: MistralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                                     sliding_window=None),
}

# As PEFT's test_decoder_models.py configures each method (an identity at init where the method allows it).
METHODS = {
    "lora": (LoraConfig, {"task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 32, "target_modules": None,
                          "lora_dropout": 0.05, "bias": "none"}),
    "alps": (AlpsConfig, {"task_type": "CAUSAL_LM", "target_heads": {0: [0, 3], 1: [1]}}),
}
PICKLE_REFUSAL = "ALPS refuses pickled adapter_model.bin files (torch.load can run code): documented policy"


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Each family saved once as a local checkpoint, the way PEFT's tests use hub ids."""
    root = tmp_path_factory.mktemp("peft-common-models")
    dirs = {}
    for name, make_config in FAMILIES.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(make_config()).save_pretrained(root / name)
        dirs[name] = str(root / name)
    return dirs


@pytest.fixture(params=list(FAMILIES))
def model_id(request, model_dirs):
    return model_dirs[request.param]


@pytest.fixture(params=list(METHODS))
def method(request):
    config_cls, kwargs = METHODS[request.param]
    return config_cls, dict(kwargs)


def _admit_alps(monkeypatch, config_cls, gate_name):
    """PEFT's mixed-adapter-batch tests open with a hard-coded list of the methods that implement the feature; ALPS
    implements it (``model(x, adapter_names=[...])``, ``generate`` with beam search), so it stands in for that name
    while the test runs. The two test bodies use the name only in that gate; the rest is method-agnostic."""
    if config_cls is AlpsConfig:
        monkeypatch.setattr(testing_common, gate_name, AlpsConfig)


def _refuses_pickle(config_cls):
    if config_cls is AlpsConfig:
        pytest.xfail(PICKLE_REFUSAL)


class TestPeftCommon(testing_common.PeftCommonTester):
    transformers_class = AutoModelForCausalLM

    def prepare_inputs_for_testing(self):
        input_ids = torch.tensor([[1, 1, 1], [1, 2, 1]]).to(self.torch_device)
        attention_mask = torch.tensor([[1, 1, 1], [1, 0, 1]]).to(self.torch_device)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def test_attributes(self, model_id, method):
        self._test_model_attr(model_id, *method)

    def test_adapter_name(self, model_id, method):
        self._test_adapter_name(model_id, *method)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    def test_add_adapter_no_autocast_adapter_dtype(self, model_id, method, dtype):
        self._test_add_adapter_no_autocast_adapter_dtype(model_id, *method, dtype=dtype)

    def test_prepare_for_training(self, model_id, method):
        self._test_prepare_for_training(model_id, *method)

    def test_save_pretrained(self, model_id, method):
        cls, kwargs = method
        self._test_save_pretrained(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_save_pretrained_pickle(self, model_id, method):
        cls, kwargs = method
        _refuses_pickle(cls)
        self._test_save_pretrained(model_id, cls, set_init_weights_false(cls, kwargs), safe_serialization=False)

    def test_save_pretrained_selected_adapters(self, model_id, method):
        cls, kwargs = method
        self._test_save_pretrained_selected_adapters(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_save_pretrained_selected_adapters_pickle(self, model_id, method):
        cls, kwargs = method
        _refuses_pickle(cls)
        self._test_save_pretrained_selected_adapters(
            model_id, cls, set_init_weights_false(cls, kwargs), safe_serialization=False
        )

    def test_from_pretrained_config_construction(self, model_id, method):
        self._test_from_pretrained_config_construction(model_id, *method)

    def test_merge_layers(self, model_id, method):
        cls, kwargs = method
        self._test_merge_layers(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_merge_layers_multi(self, model_id, method):
        cls, kwargs = method
        self._test_merge_layers_multi(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_merge_layers_nan(self, model_id, method):
        cls, kwargs = method
        self._test_merge_layers_nan(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_mixed_adapter_batches(self, model_id, method, monkeypatch):
        cls, kwargs = method
        _admit_alps(monkeypatch, cls, "RoadConfig")  # the gate is `config_cls not in (LoraConfig, RoadConfig)`
        self._test_mixed_adapter_batches(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_generate_with_mixed_adapter_batches(self, model_id, method, monkeypatch):
        cls, kwargs = method
        _admit_alps(monkeypatch, cls, "LoraConfig")  # the gate is `config_cls not in (LoraConfig,)`
        self._test_generate_with_mixed_adapter_batches_and_beam_search(
            model_id, cls, set_init_weights_false(cls, kwargs)
        )

    def test_generate(self, model_id, method):
        self._test_generate(model_id, *method)

    def test_generate_pos_args(self, model_id, method):
        self._test_generate_pos_args(model_id, *method, raises_err=False)

    def test_merge_layers_fp16(self, model_id, method):
        self._test_merge_layers_fp16(model_id, *method)

    def test_generate_half_prec(self, model_id, method):
        self._test_generate_half_prec(model_id, *method)

    def test_training(self, model_id, method):
        self._test_training(model_id, *method)

    def test_training_layer_indexing(self, model_id, method):
        self._test_training_layer_indexing(model_id, *method)

    @pytest.mark.parametrize("use_reentrant", [True, False])
    def test_training_gradient_checkpointing(self, model_id, method, use_reentrant):
        self._test_training_gradient_checkpointing(model_id, *method, use_reentrant=use_reentrant)

    def test_inference_safetensors(self, model_id, method):
        self._test_inference_safetensors(model_id, *method)

    def test_peft_model_device_map(self, model_id, method):
        self._test_peft_model_device_map(model_id, *method)

    def test_delete_adapter(self, model_id, method):
        self._test_delete_adapter(model_id, *method)

    def test_delete_inactive_adapter(self, model_id, method):
        self._test_delete_inactive_adapter(model_id, *method)

    def test_adding_multiple_adapters_with_bias_raises(self, model_id, method):
        # bias has PEFT's meaning for ALPS too (bias="all": the base model's shared biases), so PEFT's own rule holds
        self._test_adding_multiple_adapters_with_bias_raises(model_id, *method)

    def test_unload_adapter(self, model_id, method):
        cls, kwargs = method
        self._test_unload_adapter(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_weighted_combination_of_adapters(self, model_id, method):
        cls, kwargs = method
        self._test_weighted_combination_of_adapters(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_disable_adapter(self, model_id, method):
        cls, kwargs = method
        self._test_disable_adapter(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_passing_input_embeds_works(self, model_id, method):
        self._test_passing_input_embeds_works("", model_id, *method)

    def test_lora_conversion(self, model_id, method):
        cls, kwargs = method
        self._test_lora_conversion(model_id, cls, set_init_weights_false(cls, kwargs))

    def test_get_base_model_state_dict(self, model_id, method):
        self._test_get_base_model_state_dict(model_id, *method)
