"""Pollinate desktop app: tray, dashboard, chat, settings; it talks to the engine only over local HTTP."""

__version__ = "0.1.0"
