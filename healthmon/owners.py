"""Process-wide registries of live monitors, held weakly.

The loss guard, the loss recorder, the drill-down's backward wrappers and the optimizer hooks
are installed once per process and serve every live monitor. A registry that held its
monitors strongly would keep a watched model, its record buffers and its hooks alive after
the user dropped them without ``remove()`` (a notebook cell run again, a sweep in one
process). A monitor lives as long as its model (the model's hooks hold it); :class:`Owners`
holds it weakly and calls ``on_collected`` when the last one is garbage collected, so the
process-wide wrappers go away with it.
"""
from __future__ import annotations

import weakref
from typing import Callable, Iterator, List, Optional


class Owners:
    """An insertion-ordered set of objects held by weak reference (oldest first).

    Iteration sees the live objects of a snapshot, so objects added, discarded or collected
    meanwhile never disturb a loop over it. ``on_collected()`` runs when garbage collection
    takes the last object (never for :meth:`discard`, whose caller undoes what it installed).
    It runs inside the collector: it must be quick and must not raise.
    """

    def __init__(self, on_collected: Optional[Callable[[], None]] = None):
        self._refs: List[weakref.ref] = []
        self.on_collected = on_collected

    def add(self, obj) -> None:
        if obj not in self:
            self._refs = self._refs + [weakref.ref(obj, self._collected)]  # copy on write

    def discard(self, obj) -> None:
        self._refs = [r for r in self._refs if r() is not obj]

    def _collected(self, ref: weakref.ref) -> None:
        self._refs = [r for r in self._refs if r is not ref]
        if not self._refs and self.on_collected is not None:
            try:
                self.on_collected()
            except Exception:  # inside the garbage collector: never raise
                pass

    def __iter__(self) -> Iterator:
        return (obj for obj in [r() for r in self._refs] if obj is not None)

    def __reversed__(self) -> Iterator:
        return (obj for obj in [r() for r in reversed(self._refs)] if obj is not None)

    def __contains__(self, obj) -> bool:
        return any(r() is obj for r in self._refs)

    def __bool__(self) -> bool:
        return any(r() is not None for r in self._refs)
