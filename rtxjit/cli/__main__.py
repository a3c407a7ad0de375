"""``python -m rtxjit.cli``: the command line (as ``python -m rtxjit`` and the ``rtxjit`` script)."""

import sys

from rtxjit.cli import main

sys.exit(main())
