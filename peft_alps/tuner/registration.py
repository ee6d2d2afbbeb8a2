"""Make ALPS a PEFT method: add ``PeftType.ALPS`` and register the config/model pair.

PEFT's ``register_peft_method`` only accepts names that already exist in the ``PeftType`` enum, and an
external package cannot edit that enum's source. Python enums have no public API for adding a member,
so :func:`ensure_peft_type` adds one through the same internal tables that ``enum`` itself fills when a
class body is executed (``_member_map_``, ``_value2member_map_``, ``_member_names_``). It does so at
most once per process, under a lock, and verifies afterwards that every public way of reaching a
member (attribute, value lookup, name lookup, iteration, ``in``) sees the new one. If a future Python
changes these internals the verification fails loudly at import time instead of misbehaving later.
"""

from __future__ import annotations

import threading

from peft.utils import PeftType

PEFT_TYPE_NAME = "ALPS"
PREFIX = "alps_"

_lock = threading.Lock()


def _verify(member: PeftType) -> None:
    problems = []
    if getattr(PeftType, PEFT_TYPE_NAME, None) is not member:
        problems.append("attribute access")
    if PeftType(PEFT_TYPE_NAME) is not member:
        problems.append("value lookup")
    if PeftType[PEFT_TYPE_NAME] is not member:
        problems.append("name lookup")
    if member not in list(PeftType):
        problems.append("iteration")
    if member != PEFT_TYPE_NAME or hash(member) != hash(PEFT_TYPE_NAME):
        problems.append("str equality")
    if problems:
        raise RuntimeError(
            f"peft_alps could not add PeftType.{PEFT_TYPE_NAME} on this Python/PEFT combination "
            f"({', '.join(problems)} failed). Please report this with your Python and peft versions."
        )


def ensure_peft_type() -> PeftType:
    """Return ``PeftType.ALPS``, adding it to PEFT's enum the first time this is called in a process."""
    existing = PeftType.__members__.get(PEFT_TYPE_NAME)
    if existing is not None:
        return existing
    with _lock:
        existing = PeftType.__members__.get(PEFT_TYPE_NAME)
        if existing is not None:
            return existing
        member = str.__new__(PeftType, PEFT_TYPE_NAME)
        member._name_ = PEFT_TYPE_NAME
        member._value_ = PEFT_TYPE_NAME
        member.__objclass__ = PeftType
        member._sort_order_ = len(PeftType._member_names_)
        # EnumType.__setattr__ refuses to rebind members, so set the class attribute through `type`.
        type.__setattr__(PeftType, PEFT_TYPE_NAME, member)
        PeftType._value2member_map_[PEFT_TYPE_NAME] = member
        PeftType._member_map_[PEFT_TYPE_NAME] = member
        PeftType._member_names_.append(PEFT_TYPE_NAME)
        _verify(member)
        return member


def register_alps(config_cls: type, model_cls: type) -> None:
    """Register ``AlpsConfig``/``AlpsModel`` with PEFT. Safe to call any number of times.

    A second call with the same classes is a no-op. A call with other classes of the same name (e.g. after
    ``importlib.reload(peft_alps)``) rebinds the mappings to the new classes. Any other PEFT method that
    already claims ``ALPS`` or the ``alps_`` prefix is an error.
    """
    import peft.mapping as mapping
    from peft.utils import register_peft_method

    peft_type = ensure_peft_type()
    with _lock:
        current = mapping.PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type)
        if current is None:
            register_peft_method(
                name=PEFT_TYPE_NAME.lower(),
                config_cls=config_cls,
                model_cls=model_cls,
                prefix=PREFIX,
                is_mixed_compatible=True,
            )
            return
        if current.__qualname__ != config_cls.__qualname__ or current.__module__ != config_cls.__module__:
            raise RuntimeError(
                f"PeftType.{PEFT_TYPE_NAME} is already registered to {current.__module__}.{current.__qualname__}; "
                "another package claims the ALPS method name. Uninstall one of them."
            )
        # The tables register_peft_method filled; the mixed one only matters for the optional mixed integration.
        for table, value in (("PEFT_TYPE_TO_CONFIG_MAPPING", config_cls), ("PEFT_TYPE_TO_TUNER_MAPPING", model_cls),
                             ("PEFT_TYPE_TO_MIXED_MODEL_MAPPING", model_cls), ("PEFT_TYPE_TO_PREFIX_MAPPING", PREFIX)):
            if isinstance(getattr(mapping, table, None), dict):
                getattr(mapping, table)[peft_type] = value
