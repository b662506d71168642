"""`python -m engine` runs the engine's command line (same as `pollinate-engine`)."""

from engine.cli import exit_with, main

if __name__ == "__main__":  # importing this module (as tools that walk packages do) must not run anything
    exit_with(main())
