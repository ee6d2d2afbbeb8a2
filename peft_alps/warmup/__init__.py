"""The attention warm-up: a cheap task model for localization when no fine-tuned sibling exists (``train``), and the
supervised fine-tuning data it reads (``data``)."""

from peft_alps._moved import forward_old_names
from peft_alps.warmup.train import WarmupCheckpoint, warmup

__all__ = ["WarmupCheckpoint", "warmup"]

# peft_alps.warmup was the module now at peft_alps.warmup.train: its other names still resolve, with a warning
__getattr__ = forward_old_names("peft_alps.warmup", "peft_alps.warmup.train", globals())
