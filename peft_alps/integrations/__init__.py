"""Everything that reaches into PEFT's, transformers' or bitsandbytes' internals: ALPS in ``PeftMixedModel``
(``mixed``), model cards (``model_card``), quieter third-party imports (``quiet``), and the switch that turns one of
these off with one warning when the internal it needs is gone (``compat``). ``peft_alps/__init__.py`` installs them."""


def install() -> None:
    """Install what reaches into PEFT's internals, after ALPS is registered: the ALPS model card on ``push_to_hub``
    (``model_card``) and ALPS in ``PeftMixedModel`` (``mixed``). Each checks the internals it needs first and, when
    one is gone, switches itself off with one warning (``compat``); the adapter itself never depends on them."""
    from peft_alps.integrations import mixed, model_card

    model_card.install()
    mixed.install()
