"""Everything that reaches into PEFT's, transformers' or bitsandbytes' internals: ALPS in ``PeftMixedModel``
(``mixed``), model cards (``model_card``), quieter third-party imports (``quiet``), and the switch that turns one of
these off with one warning when the internal it needs is gone (``compat``). ``peft_alps/__init__.py`` installs them."""
