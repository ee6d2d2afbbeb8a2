"""Localization: the PAD score of every attention head from a base and a task checkpoint (``pad``), other scorers
(``scorers``), and the readers of attention weights they use (``sources``: folders, live modules, the Hub)."""

from peft_alps._moved import forward_old_names
from peft_alps.localization.pad import localize_heads

__all__ = ["localize_heads"]

# peft_alps.localization was the module now at peft_alps.localization.pad: its other names still resolve, with a warning
__getattr__ = forward_old_names("peft_alps.localization", "peft_alps.localization.pad", globals())
