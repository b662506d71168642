"""Thin windows: they show a view model and forward the user's actions to it."""
