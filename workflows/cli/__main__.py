"""`python -m lamflow.workflows.cli ...`: the `lamflow` command (as `torchrun -m` runs it)."""

import sys

from . import main

sys.exit(main())
