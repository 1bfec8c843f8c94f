"""`python -m pairfree.cli ...` is the `pairfree` command."""

import sys

from pairfree.cli import main

sys.exit(main())
