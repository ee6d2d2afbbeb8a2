"""peft-alps: ALPS (Attention Localization and Pruning Strategy) as a Hugging Face PEFT method.

Importing this package adds ``PeftType.ALPS`` to PEFT and registers :class:`AlpsConfig` /
:class:`AlpsModel`, after which ``get_peft_model``, ``PeftModel.from_pretrained`` and friends accept ALPS
adapters exactly as they accept LoRA ones.
"""

from peft_alps import _moved
from peft_alps import integrations as _integrations
from peft_alps.integrations import quiet as _quiet

_moved.install()  # the module paths before the stage folders still import, with a DeprecationWarning
_quiet.install()  # before PEFT imports bitsandbytes (see peft_alps/integrations/quiet.py)

from peft_alps._version import __version__  # noqa: E402
from peft_alps.integrations.mixed import save_mixed_adapters  # noqa: E402
from peft_alps.layouts import (HeadDims, HeadLayout, Projection, get_layout, register_layout,  # noqa: E402
                               supported_model_types)
from peft_alps.localization.pad import localize_heads  # noqa: E402
from peft_alps.scores import HeadScores, select_layer_consistent, select_random  # noqa: E402
from peft_alps.tuner.config import AlpsConfig  # noqa: E402
from peft_alps.tuner.export import export_to_lora  # noqa: E402
from peft_alps.tuner.layer import AlpsLayer, Linear  # noqa: E402
from peft_alps.tuner.model import AlpsModel  # noqa: E402
from peft_alps.tuner.paper_recipe import modules_outside_attention, paper_recipe  # noqa: E402
from peft_alps.tuner.registration import register_alps  # noqa: E402
from peft_alps.warmup.train import WarmupCheckpoint, warmup  # noqa: E402

register_alps(AlpsConfig, AlpsModel)
# the model card on push_to_hub and ALPS in PeftMixedModel reach into PEFT internals: each switches off with one
# warning (and raises only when used) if PEFT changed them
_integrations.install()

__all__ = [
    "AlpsConfig",
    "AlpsLayer",
    "AlpsModel",
    "HeadDims",
    "HeadLayout",
    "HeadScores",
    "export_to_lora",
    "Linear",
    "Projection",
    "get_layout",
    "localize_heads",
    "modules_outside_attention",
    "paper_recipe",
    "register_layout",
    "select_layer_consistent",
    "select_random",
    "save_mixed_adapters",
    "supported_model_types",
    "warmup",
    "WarmupCheckpoint",
]
