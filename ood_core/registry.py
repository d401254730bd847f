"""One registry mechanism (a class decorator) for scores, perturbations and metrics; imports
nothing but the standard library."""

from __future__ import annotations

import difflib


class Registry(dict):
    """Name -> class, filled by the :meth:`register` class decorator: the one registry mechanism
    of scores, perturbations and metrics. A class registers under its ``key`` attribute when it
    has one, else its class name; :meth:`get_class` fails with a "did you mean" message."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, cls: type) -> type:
        """Class decorator: add ``cls`` (a name already taken by another class is an error)."""
        name = getattr(cls, "key", None) or cls.__name__
        if not isinstance(name, str) or not name:
            raise ValueError(f"cannot register {cls.__name__} as a {self.kind}: empty name")
        if self.get(name, cls) is not cls:
            raise ValueError(
                f"cannot register {cls.__name__}: the {self.kind} name {name!r} is "
                f"taken by {self[name].__module__}.{self[name].__name__}"
            )
        self[name] = cls
        return cls

    def get_class(self, name: str) -> type:
        if name in self:
            return self[name]
        close = difflib.get_close_matches(str(name), list(self), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown {self.kind} {name!r}.{hint} Available: {', '.join(self)}.")
