"""Check a saved ALPS adapter *before* it is loaded: safetensors only, complete, the right shapes, finite.

PEFT loads adapter weights only after it has injected the adapter layers into the user's model, and it
accepts a pickle ``adapter_model.bin`` (through ``torch.load(weights_only=True)``), a partial file (with a
warning) or NaN weights without a word. For ALPS adapters this module runs first, from
``AlpsModel._prepare_model``, so that a bad file fails before any module is replaced and names the file and
the fix:

* only ``adapter_model.safetensors`` is read; a folder or repo that holds only a pickle ``adapter_model.bin``
  is refused (the pickle is never opened);
* the safetensors header must parse and the file must be as long as its header says (truncated or corrupted
  downloads are caught here, not deep inside ``safe_open``);
* the file must hold exactly the ALPS tensors that the adapter config creates on this base model, with the
  same shapes (a partial file, or a file from other ``target_heads``, is refused);
* every ALPS tensor must be finite.

The checks run for configs read with ``AlpsConfig.from_pretrained`` (which ``PeftModel.from_pretrained``,
``load_adapter`` and ``AutoPeftModel*`` use); the config remembers where it came from in
:class:`AdapterSource`. A config passed in explicitly (``PeftModel.from_pretrained(..., config=cfg)``) has no
source and is loaded by PEFT alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
STATE_DICT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSource:
    """Where an adapter config was read from: a local folder or a Hub repo id, plus hf_hub_download kwargs."""

    model_id: str
    subfolder: str | None = None
    hub_kwargs: Mapping[str, Any] = field(default_factory=dict)

    @property
    def local_dir(self) -> str:
        return os.path.join(self.model_id, self.subfolder) if self.subfolder else self.model_id

    def describe(self) -> str:
        return self.local_dir if os.path.isdir(self.local_dir) else f"Hub repo {self.model_id!r}" + (
            f" (subfolder {self.subfolder!r})" if self.subfolder else ""
        )


def resolve_weights_file(source: AdapterSource) -> str:
    """Path of the adapter's ``adapter_model.safetensors`` (downloaded to / read from the HF cache for repo ids).

    Raises ``FileNotFoundError`` when there is none, and ``OSError`` when only a pickle file is offered.
    """
    if os.path.isdir(source.local_dir):
        path = os.path.join(source.local_dir, SAFETENSORS_NAME)
        if os.path.isfile(path):
            return path
        if os.path.isfile(os.path.join(source.local_dir, PICKLE_NAME)):
            raise _pickle_refused(source.describe())
        raise FileNotFoundError(
            f"no {SAFETENSORS_NAME} in {source.local_dir}: the adapter folder holds only "
            f"{sorted(os.listdir(source.local_dir))}. Save the adapter again with model.save_pretrained(...)."
        )

    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RemoteEntryNotFoundError

    kwargs = {k: v for k, v in source.hub_kwargs.items() if k != "subfolder"}
    try:
        return hf_hub_download(source.model_id, SAFETENSORS_NAME, subfolder=source.subfolder, **kwargs)
    except RemoteEntryNotFoundError:
        raise _pickle_refused(source.describe(), remote=True) from None
    except LocalEntryNotFoundError as exc:
        if _pickle_cached(source, kwargs):
            raise _pickle_refused(f"the cached copy of {source.describe()}") from None
        raise FileNotFoundError(
            f"{SAFETENSORS_NAME} of {source.describe()} is not in the local Hugging Face cache and the Hub cannot "
            "be reached (HF_HUB_OFFLINE=1 or no network). Download the adapter once while online, or pass the "
            "path of a local copy."
        ) from exc
    except EntryNotFoundError:
        raise _pickle_refused(source.describe(), remote=True) from None


def _pickle_cached(source: AdapterSource, kwargs: Mapping[str, Any]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    filename = f"{source.subfolder}/{PICKLE_NAME}" if source.subfolder else PICKLE_NAME
    found = try_to_load_from_cache(
        source.model_id, filename, cache_dir=kwargs.get("cache_dir"), revision=kwargs.get("revision"),
        repo_type=kwargs.get("repo_type"),
    )
    return isinstance(found, str)


def _pickle_refused(where: str, remote: bool = False) -> OSError:
    found = "has no" if remote else f"has a pickle {PICKLE_NAME} but no"
    return OSError(
        f"{where} {found} {SAFETENSORS_NAME}. ALPS adapters are loaded only from safetensors; pickle files can "
        f"run code when they are opened, so {PICKLE_NAME} is never read. Re-save the adapter with "
        "model.save_pretrained(path) (safe_serialization=True is the default) and load that folder."
    )


def read_header(path: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{tensor name: (dtype, shape)}`` from a safetensors file, or an ``OSError`` naming a damaged file."""
    try:
        with safe_open(path, framework="pt") as f:
            return {name: (str(f.get_slice(name).get_dtype()), tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise OSError(
            f"{path} is truncated or corrupted ({size} bytes; safetensors says: {exc}). Re-save the adapter with "
            "model.save_pretrained(...), or delete the file and download it again."
        ) from exc


def check_adapter_file(path: str, expected: Mapping[str, tuple[int, ...]]) -> None:
    """Check that the safetensors file at ``path`` holds exactly the ``expected`` ALPS tensors, all finite.

    ``expected`` maps saved tensor names (``base_model.model.<module>.alps_delta``) to shapes. Tensors that are
    not ALPS tensors (e.g. ``modules_to_save`` copies) are left to PEFT.
    """
    header = read_header(path)
    found = {name: shape for name, (_, shape) in header.items() if ".alps_" in name}
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    _check_bias_setting(path, missing, unexpected)
    if missing:
        raise ValueError(
            f"{path} is missing {len(missing)} of the {len(expected)} ALPS tensors that its adapter_config.json "
            f"needs on this base model, e.g. {missing[0]!r}. The file is partial or belongs to another adapter: "
            "re-save the adapter with model.save_pretrained(...) or download it again."
        )
    if unexpected:
        raise ValueError(
            f"{path} holds {len(unexpected)} ALPS tensors that its adapter_config.json does not create on this base "
            f"model, e.g. {unexpected[0]!r}. The config's target_heads/target_modules do not match the weights: "
            "save config and weights together with model.save_pretrained(...)."
        )
    for name, shape in expected.items():
        if found[name] != tuple(shape):
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(found[name])}, but the adapter config needs "
                f"{list(shape)} on this base model. The weights were trained for other target_heads or another "
                "base model; load them with the adapter_config.json they were saved with."
            )
    with safe_open(path, framework="pt") as f:
        for name in sorted(found):
            tensor = f.get_tensor(name)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                bad = int((~torch.isfinite(tensor)).sum())
                raise ValueError(
                    f"{path}: tensor {name!r} has {bad} NaN/inf values; the adapter is broken (diverged training or "
                    "a damaged file). Retrain with a lower learning rate, or re-save/re-download it."
                )


def _check_bias_setting(path: str, missing: list[str], unexpected: list[str]) -> None:
    """Name the ``bias`` setting when it is all that separates the file from its config."""
    def only_bias(names: list[str]) -> bool:
        return bool(names) and all(name.endswith(".alps_bias") for name in names)

    if only_bias(unexpected) and not missing:
        raise ValueError(
            f"{path} holds bias deltas ({len(unexpected)} alps_bias tensors, e.g. {unexpected[0]!r}), but its "
            "adapter_config.json has alps_bias=false. The adapter was trained with alps_bias=True: set "
            "\"alps_bias\": true in adapter_config.json, or save config and weights together with "
            "model.save_pretrained(...)."
        )
    if only_bias(missing) and not unexpected:
        raise ValueError(
            f"{path} has no bias deltas (e.g. {missing[0]!r}), but its adapter_config.json has alps_bias=true. "
            "The adapter was trained without them: set \"alps_bias\": false in adapter_config.json."
        )


def expected_tensors(
    modules: Iterable[tuple[str, int, int, str, int, bool]],
) -> dict[str, tuple[int, ...]]:
    """Saved-name -> shape for ``(module key, in_features, out_features, axis, n_index, has_bias)`` entries."""
    out: dict[str, tuple[int, ...]] = {}
    for key, in_features, out_features, axis, n, has_bias in modules:
        name = f"{STATE_DICT_PREFIX}{key}"
        out[f"{name}.alps_delta"] = (n, in_features) if axis == "out" else (out_features, n)
        if axis == "out" and has_bias:
            out[f"{name}.alps_bias"] = (n,)
    return out
