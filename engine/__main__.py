"""`python -m engine` runs the engine's command line (same as `pollinate-engine`)."""

from engine.cli import console_main

if __name__ == "__main__":  # importing this module (as tools that walk packages do) must not run anything
    console_main()
