"""The ALPS tuner, on the model of ``peft/tuners/lora``: :class:`AlpsConfig` (``config``), the head-sliced layers
(``layer``) and :class:`AlpsModel` (``model``), with what the model needs: PEFT registration, per-row adapter routing
(``mixed_batches``), weighted adapters, partial backprop, quantized bases, safe loading, the LoRA export and the
paper's training recipe. The tuner imports nothing of localization, the Hub, the warm-up, the demos or the CLI."""

from peft_alps.tuner.config import AlpsConfig
from peft_alps.tuner.layer import AlpsLayer, Linear
from peft_alps.tuner.model import AlpsModel

__all__ = ["AlpsConfig", "AlpsLayer", "AlpsModel", "Linear"]
