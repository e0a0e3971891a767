"""``python -m instructflow STAGE ...``: the same command line as the ``instructflow`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
