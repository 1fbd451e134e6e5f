"""``python -m layerfold``: the same command as ``layerfold`` (what ``accelerate launch -m layerfold`` runs)."""

import sys

from .cli.entry import main

sys.exit(main())
