"""``python -m magprune``: the CLI, also as ``torchrun --nproc_per_node=N -m magprune run CONFIG``."""

import sys

from magprune.cli import main

sys.exit(main())
