"""python -m tinyserve: the command line (tinyserve/cli/main.py)."""

import sys

from tinyserve.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
