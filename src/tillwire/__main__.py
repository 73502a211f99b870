"""Entry point of ``python -m tillwire`` and of the ``tillwire`` console script.

The command line itself lives in :mod:`tillwire.server.cli`.
"""

import sys

from tillwire.server.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
