"""Narrow filters for third-party messages that a peft-alps user cannot act on.

* bitsandbytes 0.50, on CPUs with AVX512-BF16, logs "Failed to load CPU gemm_4bit_forward from kernels-community:
  No module named 'kernels' ..." from ``bitsandbytes.backends.cpu.ops`` when it is imported (by PEFT, so by every
  ``import peft_alps``). It only says that an optional accelerated kernel from the ``kernels`` package is not
  installed; the built-in CPU path is used. Only that record of that logger is dropped, and only if this filter is
  in place before bitsandbytes is imported.
"""

from __future__ import annotations

import logging

BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_NOTICE = "Failed to load CPU gemm_4bit_forward from kernels-community"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Put the filters in place (idempotent)."""
    logger = logging.getLogger(BNB_CPU_LOGGER)
    if not any(isinstance(f, _DropMessage) and f.prefix == BNB_KERNELS_NOTICE for f in logger.filters):
        logger.addFilter(_DropMessage(BNB_KERNELS_NOTICE))
