"""``python -m duravip_lab ...``: the ``lab`` command, for when the package is installed."""

import sys

from .cli import main

sys.exit(main())
