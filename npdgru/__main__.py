"""``python -m npdgru``: the ``npdgru`` command."""

import sys

from .cli import main

sys.exit(main())
