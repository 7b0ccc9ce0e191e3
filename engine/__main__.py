"""`python -m lmarith ...` runs the command line."""
import sys

from .entrypoints.cli import main

sys.exit(main())
