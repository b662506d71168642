"""Entry point PyInstaller freezes: the desktop app (`app.main`), nothing of the engine."""

import sys

from app.main import main

if __name__ == "__main__":
    sys.exit(main())
