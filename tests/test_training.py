"""Training integrations: Trainer, TRL SFTTrainer, gradient checkpointing, partial backpropagation, resume, errors."""

import os

import pytest
import torch
import transformers
from datasets import Dataset
from peft import get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    MambaConfig,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from trl import SFTConfig, SFTTrainer

import peft_alps  # noqa: F401  (registers ALPS with PEFT)
from peft_alps import AlpsConfig
from tests.support.tiny_models import VOCAB, batch, tiny_llama

transformers.logging.set_verbosity_error()

HEADS = {1: [0, 5], 2: [3]}  # tiny_llama: 3 layers, 8 query heads, 2 KV groups, head_dim 8, hidden 64
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def token_dataset(n=16, length=12, seed=0):
    ids = torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def trainer_args(out, **kw):
    defaults = dict(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-2, weight_decay=0.1,
        warmup_steps=1, save_steps=3, seed=3, use_cpu=True, report_to=[], disable_tqdm=True, logging_steps=1,
    )
    return TrainingArguments(**{**defaults, **kw})


class StopAt(TrainerCallback):
    """Interrupt training after `step` optimizer steps (as a crash would, right after a checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def deltas(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_trainer(out, resume=None, stop_at=None, base=None, heads=HEADS):
    model = get_peft_model(base if base is not None else tiny_llama(), AlpsConfig(target_heads=heads))
    callbacks = [StopAt(stop_at)] if stop_at else None
    trainer = Trainer(model=model, args=trainer_args(out), train_dataset=token_dataset(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run, and a run stopped after step 3 (its checkpoint-3 is the resume point)."""
    full = run_trainer(tmp_path_factory.mktemp("full"))
    stopped_dir = tmp_path_factory.mktemp("stopped")
    stopped = run_trainer(stopped_dir, stop_at=3)
    return {"full": full, "stopped": stopped, "checkpoint": stopped_dir / "checkpoint-3"}


# ------------------------------------------------------------------------------------------ Trainer


def test_optimizer_sees_only_the_deltas(runs):
    trainer = runs["full"]
    in_optimizer = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    got = sorted(names[id(p)] for p in in_optimizer)
    # Written independently: one delta per targeted projection of each layer that has a selected head.
    want = sorted(f"base_model.model.model.layers.{layer}.self_attn.{proj}.alps_delta.default"
                  for layer in HEADS for proj in ATTN)
    assert got == want
    assert len(in_optimizer) == len({id(p) for p in in_optimizer})


def test_training_moves_only_the_deltas(runs):
    trainer, reference = runs["full"], tiny_llama()
    model = trainer.model
    assert all(v.abs().max() > 0 for v in deltas(model).values())
    frozen = {k.replace(".base_layer", ""): v for k, v in model.get_base_model().state_dict().items() if ".alps_" not in k}
    want = reference.state_dict()
    assert sorted(frozen) == sorted(want)
    assert all(torch.equal(frozen[k], want[k]) for k in want)


def test_checkpoint_holds_only_the_adapter(runs):
    files = set(os.listdir(runs["checkpoint"]))
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}
    saved = load_file(str(runs["checkpoint"] / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(f"base_model.model.model.layers.{layer}.self_attn.{proj}.alps_delta"
                                   for layer in HEADS for proj in ATTN)


def test_resume_from_checkpoint_is_bit_for_bit(runs, tmp_path):
    uninterrupted = deltas(runs["full"].model)
    stopped = deltas(runs["stopped"].model)
    assert any(not torch.equal(stopped[k], uninterrupted[k]) for k in uninterrupted)  # really stopped half way
    resumed = run_trainer(runs["checkpoint"].parent, resume=str(runs["checkpoint"]))
    assert resumed.state.global_step == 6
    got = deltas(resumed.model)
    assert sorted(got) == sorted(uninterrupted)
    assert all(torch.equal(got[k], uninterrupted[k]) for k in uninterrupted)


@pytest.mark.parametrize(
    "base,heads,shows",
    [
        (lambda: tiny_llama(num_heads=4, head_dim=16), {1: [0]}, "layers.2.self_attn.q_proj (delta): saved, but"),
        (lambda: tiny_llama(), {1: [0]}, "layers.1.self_attn.q_proj (delta): saved [16, 64], this adapter has [8, 64]"),
    ],
    ids=["other-base", "other-heads"],
)
def test_resume_onto_another_base_names_the_fix(runs, tmp_path, base, heads, shows):
    with pytest.raises(ValueError) as err:
        run_trainer(tmp_path, resume=str(runs["checkpoint"]), base=base(), heads=heads)
    message = str(err.value)
    assert shows in message
    assert "another base model or another head selection" in message
    assert "AlpsConfig.from_pretrained(checkpoint_dir)" in message


# ------------------------------------------------------------------------------------------ partial backprop

LOWEST, LAYERS = 2, 4
BACKPROP_HEADS = {LOWEST: [1], 3: [0]}


def backprop_trace(model):
    """Which decoder layers' input / output tensors receive a gradient in one training step's backward pass."""
    fired, handles = set(), []
    for i, layer in enumerate(model.get_base_model().model.layers):

        def on_input(module, args, kwargs, i=i):
            if args[0].requires_grad:
                args[0].register_hook(lambda grad, i=i: fired.add(("in", i)))

        def on_output(module, args, kwargs, output, i=i):
            output = output[0] if isinstance(output, tuple) else output
            if output.requires_grad:
                output.register_hook(lambda grad, i=i: fired.add(("out", i)))

        # Registered last, so they see the input after any hook that peft_alps installed.
        handles += [layer.register_forward_pre_hook(on_input, with_kwargs=True),
                    layer.register_forward_hook(on_output, with_kwargs=True)]
    model.train()
    x = batch()
    model(x, labels=x).loss.backward()
    for handle in handles:
        handle.remove()
    return fired


def expected_trace(lowest, boundary_input=False):
    outputs = {("out", i) for i in range(lowest, LAYERS)}
    inputs = {("in", i) for i in range(lowest + 1, LAYERS)}  # = outputs of the layer below
    return outputs | inputs | ({("in", lowest)} if boundary_input else set())


def backprop_model():
    return get_peft_model(tiny_llama(layers=LAYERS), AlpsConfig(target_heads=BACKPROP_HEADS))


def assert_deltas_got_gradients(model):
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trained)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize(
    "checkpointing,reentrant",
    [(False, None), (True, False), (True, True)],
    ids=["no-checkpointing", "non-reentrant", "reentrant"],
)
def test_backward_stops_at_the_lowest_trained_layer(checkpointing, reentrant):
    model = backprop_model()
    if checkpointing:  # what Trainer(gradient_checkpointing=True) calls; it also calls enable_input_require_grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    fired = backprop_trace(model)
    # Reentrant checkpointing backpropagates into a layer only through an input that requires grad, so the lowest
    # trained layer's input is the one activation gradient computed at the boundary; nothing below it.
    assert fired == expected_trace(LOWEST, boundary_input=bool(reentrant))
    assert_deltas_got_gradients(model)


@pytest.mark.parametrize("reentrant", [None, False, True], ids=["no-checkpointing", "non-reentrant", "reentrant"])
def test_embedding_output_requires_grad_and_backward_still_stops(reentrant):
    # transformers' (and PEFT's prepare-for-training) contract: after enable_input_require_grads the embedding output
    # requires grad. The graph is re-rooted above it, so no backward runs below the lowest trained layer.
    model = backprop_model()
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    assert model.get_input_embeddings()(batch()).requires_grad
    assert backprop_trace(model) == expected_trace(LOWEST, boundary_input=bool(reentrant))
    assert_deltas_got_gradients(model)


def test_trained_embeddings_keep_the_whole_graph():
    model = backprop_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)  # e.g. modules_to_save=["embed_tokens"]
    assert backprop_trace(model) == expected_trace(0, boundary_input=True)
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0


def test_gradients_of_the_callers_inputs_embeds_still_flow():
    # Only the requires-grad that enable_input_require_grads adds is cut; inputs_embeds a caller wants gradients of
    # (saliency, attacks) keep them.
    model = backprop_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    x = batch()
    embeds = model.get_input_embeddings().weight[x].detach().requires_grad_(True)
    model.train()
    model(inputs_embeds=embeds, labels=x).loss.backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_embedding_hooks_installed_before_the_adapter_are_replaced():
    # prepare_model_for_kbit_training enables input grads (twice) before get_peft_model sees the model.
    base = tiny_llama(layers=LAYERS)
    base.enable_input_require_grads()
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model = get_peft_model(base, AlpsConfig(target_heads=BACKPROP_HEADS))
    assert backprop_trace(model) == expected_trace(LOWEST, boundary_input=True)
    assert_deltas_got_gradients(model)


def test_training_something_lower_moves_the_boundary_down():
    model = backprop_model()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    extra = model.get_base_model().model.layers[1].mlp.down_proj.weight
    extra.requires_grad_(True)  # the user trains something in layer 1
    assert backprop_trace(model) == expected_trace(1, boundary_input=True)
    assert extra.grad is not None and extra.grad.abs().sum() > 0


def test_unloaded_model_gets_transformers_behaviour_back():
    merged = backprop_model().merge_and_unload()
    assert "enable_input_require_grads" not in vars(merged)
    merged.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    merged.model.layers[3].self_attn.q_proj.weight.requires_grad_(True)
    x = batch()
    merged.train()
    assert merged.model.embed_tokens(x).requires_grad  # transformers' embedding hook is back


# ------------------------------------------------------------------------------------------ TRL SFTTrainer


def word_tokenizer():
    """A whitespace tokenizer over tiny_llama's vocabulary, built offline: tokens t0..t96."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def prompt_completion_dataset(n=12):
    g = torch.Generator().manual_seed(0)
    words = [[f"t{int(i)}" for i in torch.randint(3, VOCAB, (10,), generator=g)] for _ in range(n)]
    return Dataset.from_dict({"prompt": [" ".join(w[:6]) for w in words],
                              "completion": [" " + " ".join(w[6:]) for w in words]})


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_sft_trainer_with_alps_peft_config(tmp_path, checkpointing):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                     gradient_checkpointing=checkpointing, max_length=32, use_cpu=True, bf16=False, report_to=[],
                     disable_tqdm=True, save_strategy="no", logging_steps=1)
    trainer = SFTTrainer(model=tiny_llama(layers=LAYERS), args=args, train_dataset=prompt_completion_dataset(),
                         processing_class=word_tokenizer(), peft_config=AlpsConfig(target_heads=BACKPROP_HEADS))
    model = trainer.model
    assert model.peft_config["default"].peft_type == "ALPS"
    if checkpointing:  # TRL and Trainer both asked for input grads; autograd still stops at the lowest layer
        assert backprop_trace(model) == expected_trace(LOWEST)
        model.zero_grad(set_to_none=True)
    before = deltas(model)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    after = deltas(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)
    trainer.save_model(str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "adapter"))
    assert not any(f.startswith("model") for f in os.listdir(tmp_path / "adapter"))


# ------------------------------------------------------------------------------------------ misuse


def sft(tmp_path, model, peft_config):
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, use_cpu=True, bf16=False, report_to=[], max_length=32)
    return SFTTrainer(model=model, args=args, train_dataset=prompt_completion_dataset(4),
                      processing_class=word_tokenizer(), peft_config=peft_config)


@pytest.mark.parametrize("heads", [None, {}, []], ids=["missing", "empty-dict", "empty-list"])
def test_config_without_heads_says_how_to_choose_them(heads):
    with pytest.raises(ValueError, match=r"target_heads|select at least one") as err:
        AlpsConfig(target_heads=heads) if heads is not None else AlpsConfig()
    assert "head" in str(err.value)
    if heads is None:
        assert "localize_heads" in str(err.value)


def test_sft_trainer_on_a_model_without_supported_attention(tmp_path):
    mamba = AutoModelForCausalLM.from_config(
        MambaConfig(hidden_size=16, num_hidden_layers=2, vocab_size=VOCAB, state_size=4))
    with pytest.raises(ValueError) as err:
        sft(tmp_path, mamba, AlpsConfig(target_heads={0: [0]}))
    message = str(err.value)
    assert "'mamba'" in message and "llama" in message  # the bad value and the valid ones
    assert "register_layout" in message  # the fix


def test_sft_trainer_with_heads_outside_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"head 8 out of range: layer 1 has 8 query heads \(0\.\.7\)"):
        sft(tmp_path, tiny_llama(), AlpsConfig(target_heads={1: [8]}))


def test_model_with_the_override_pickles_and_copies():
    import copy
    import io

    model = backprop_model()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), copy.deepcopy(model)):
        clone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        assert backprop_trace(clone) == expected_trace(LOWEST, boundary_input=True)  # the copy's own layers
        assert_deltas_got_gradients(clone)
