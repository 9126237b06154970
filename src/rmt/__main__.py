"""``python -m rmt`` runs the command line (also under ``torchrun -m rmt``)."""
import sys

from .cli import main

sys.exit(main())
