"""Run the ``tinyweb`` command as ``python -m tinyweb.cli``."""

import sys

from tinyweb.cli import main

sys.exit(main())
