"""`python -m peftkit.cli` is the `peftkit` command (what `accelerate launch -m peftkit.cli` runs)."""

import sys

from peftkit.cli import main

sys.exit(main())
