"""``python -m npdgru.train``: the same as ``npdgru train``."""

import sys

from .loop import main

sys.exit(main())
