"""``python -m npdgru.train``: the same as ``npdgru train`` (an NpdgruError as one line, exit status 2)."""

import sys

from ..errors import NpdgruError
from .loop import main

if __name__ == "__main__":
    try:
        sys.exit(main())
    except NpdgruError as e:
        sys.exit(f"npdgru: error: {e}")
