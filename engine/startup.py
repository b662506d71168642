"""What the engine's command line does before it imports its heavy dependencies, to start sooner."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# Imported when hivemind is, used only by parts the engine never runs (averaging's load balancing).
UNUSED_AT_START = ("scipy.optimize",)


class _LoadedOnFirstUse(types.ModuleType):
    """Stands in for a module until someone reads an attribute it lacks; then imports the real one.

    Not importlib's LazyLoader: that loads on any attribute, and torch's import walks sys.modules reading
    every module's __file__ (inspect.getmodule), which would load it at once.
    """

    def __getattr__(self, attribute: str):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(importlib.import_module(self.__name__), attribute)


def defer_unused_imports() -> None:
    """Let the modules in UNUSED_AT_START load on first use instead of when imported.

    `import hivemind` runs `import scipy.optimize` for its averaging: about 0.8 s of every engine and server
    start on 2 busy cores, for nothing. A stand-in takes its place until it is used.
    """
    for name in UNUSED_AT_START:
        if name in sys.modules:
            continue
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:
            continue
        if spec is None:
            continue
        stand_in = _LoadedOnFirstUse(name)
        stand_in.__file__ = spec.origin
        stand_in.__spec__ = spec
        sys.modules[name] = stand_in
        parent, _, child = name.rpartition(".")
        setattr(sys.modules[parent], child, stand_in)
