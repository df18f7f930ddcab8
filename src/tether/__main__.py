"""``python -m tether``: the ``tether`` command (what ``torchrun --nproc-per-node N -m tether ...`` runs)."""

import sys

from tether.cli import main

sys.exit(main())
