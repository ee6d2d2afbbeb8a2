"""The ``peft-alps`` command line lives in the light top-level package :mod:`peft_alps_cli` (so that parsing and
``--help`` do not import torch); this module keeps ``peft_alps.cli`` and ``python -m peft_alps.cli`` working."""

import sys

from peft_alps_cli import BUILTIN_MODEL_NAMES, COMMANDS, build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
