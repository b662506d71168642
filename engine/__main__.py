"""`python -m engine` runs the engine's command line (same as `pollinate-engine`)."""

import sys

from engine.cli import main

if __name__ == "__main__":  # importing this module (as tools that walk packages do) must not run anything
    sys.exit(main())
