"""Attributes set on one object only, shadowing its class's, and undone exactly.

Compression never changes a class or a module: every override (an image-feature function, a ``forward``
or ``generate`` wrapper) is an attribute of the one model instance (or of one of its submodules),
recorded here so that ``vlmzip.decompress`` restores what was there before.
"""

from __future__ import annotations


class InstanceAttr:
    """An attribute set on one object (shadowing its class's); ``undo`` restores what was there."""

    def __init__(self, obj: object, name: str, value: object) -> None:
        self.obj, self.name = obj, name
        self.had = name in vars(obj)
        self.previous = vars(obj).get(name)
        setattr(obj, name, value)

    def undo(self) -> None:
        """Put back the instance's own attribute, or remove ours so the class's shows again."""
        if self.had:
            setattr(self.obj, self.name, self.previous)
        else:
            delattr(self.obj, self.name)
