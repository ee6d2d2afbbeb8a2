"""``python -m peft_alps_cli`` = ``peft-alps``."""

import sys

from . import main

sys.exit(main())
