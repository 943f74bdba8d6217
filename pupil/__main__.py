"""`python -m pupil ...` is the `pupil` command."""
import sys

from .cli import main

sys.exit(main())
