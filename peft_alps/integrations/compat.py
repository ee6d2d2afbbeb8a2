"""Optional integrations that build on PEFT/transformers internals switch off, with one warning, when those change.

``import peft_alps`` must work on any PEFT/transformers release that has the public APIs the ALPS adapter uses.
The integrations that reach further (ALPS inside ``PeftMixedModel``, the ALPS model card on ``push_to_hub``)
check what they rely on at import. When something is missing they call :func:`switch_off`: one
:class:`IntegrationUnavailableWarning` naming the versions and what changed, and the reason is kept so that the
integration raises it only when the user actually asks for the feature.
"""

from __future__ import annotations

import warnings
from typing import Optional


class IntegrationUnavailableWarning(UserWarning):
    """An optional peft_alps integration is off because a PEFT/transformers internal it builds on changed."""


_switched_off: dict[str, str] = {}


def versions() -> str:
    """``peft X, transformers Y``: the releases a warning or error is about."""
    import peft
    import transformers

    return f"peft {peft.__version__}, transformers {transformers.__version__}"


def switch_off(feature: str, reason: str, consequence: str, warn: bool = True) -> None:
    """Record that ``feature`` is off because of ``reason``; warn once per feature and process."""
    first = feature not in _switched_off
    _switched_off[feature] = reason
    if warn and first:
        warnings.warn(
            f"peft_alps: {feature} is switched off on {versions()}: {reason}. {consequence}",
            IntegrationUnavailableWarning,
            stacklevel=3,
        )


def switched_off(feature: str) -> Optional[str]:
    """Why ``feature`` is off, or ``None`` if it is on."""
    return _switched_off.get(feature)


def switch_on(feature: str) -> None:
    _switched_off.pop(feature, None)
