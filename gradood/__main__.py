"""`python -m gradood demo` / `python -m gradood bench ...`: the gradood command."""

import sys

from gradood.cli import main

if __name__ == "__main__":
    sys.exit(main())
