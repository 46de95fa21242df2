"""``python -m sessionstore``: the same as the ``sessionstore`` command."""

import sys

from .cli import main

sys.exit(main())
