import sys

from rtxjit.cli import main

sys.exit(main())
