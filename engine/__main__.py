"""`python -m engine` runs the engine's command line (same as `pollinate-engine`)."""

import sys

from engine.cli import main

sys.exit(main())
