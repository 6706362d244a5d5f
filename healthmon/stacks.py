"""Cheap Python stack capture for the hot path, formatted only when an anomaly is reported.

:meth:`StackTable.capture` walks ``frame.f_back`` and builds a tuple of ``(code, lineno)``
pairs (no strings, no file access, no ``FrameSummary``); identical stacks (the same call
site, every step) are interned to one small integer id, so a step costs one dict lookup
per module call. :meth:`StackTable.frames` turns an id into ``traceback.FrameSummary``
objects (source lines through ``linecache``) when a report needs them.

Memory is bounded: the table holds at most ``max_stacks`` distinct stacks; beyond that new
stacks are recorded as the id of a shared "stack table full" entry.
"""
from __future__ import annotations

import sys
import traceback
from typing import Dict, List, Tuple

StackKey = Tuple[Tuple[object, int], ...]

_FULL = -1


def _is_machinery(filename: str) -> bool:
    """Frames nobody debugs: torch's module-call and hook layers, runpy, healthmon's CLI."""
    name = filename.replace("\\", "/")
    return name.endswith(("/torch/nn/modules/module.py", "/torch/utils/hooks.py",
                          "/torch/_tensor.py", "/healthmon/runner.py",
                          "/healthmon/__main__.py")) or name.startswith("<frozen runpy")


class StackTable:
    """Interning table of captured stacks (one per monitor)."""

    def __init__(self, max_depth: int = 64, max_stacks: int = 4096):
        self.max_depth = max_depth
        self.max_stacks = max_stacks
        self._ids: Dict[StackKey, int] = {}
        self._keys: List[StackKey] = []

    def __len__(self) -> int:
        return len(self._keys)

    def capture(self, skip: int = 1) -> int:
        """Id of the current Python stack, starting ``skip`` frames above the caller."""
        frame = sys._getframe(skip + 1)
        key = []
        depth = self.max_depth
        while frame is not None and depth:
            key.append((frame.f_code, frame.f_lineno))
            frame = frame.f_back
            depth -= 1
        key = tuple(key)
        sid = self._ids.get(key)
        if sid is None:
            if len(self._keys) >= self.max_stacks:
                return _FULL
            sid = len(self._keys)
            self._ids[key] = sid
            self._keys.append(key)
        return sid

    def frames(self, sid: int) -> List[traceback.FrameSummary]:
        """The stack ``sid`` as FrameSummary objects, outermost first (like
        ``traceback.extract_stack``); empty for an unknown id."""
        if sid is None or sid < 0 or sid >= len(self._keys):
            return []
        # drop the module-call / hook machinery frames (torch's Module.__call__ layers)
        return [traceback.FrameSummary(code.co_filename, lineno, code.co_name)
                for code, lineno in reversed(self._keys[sid])
                if not _is_machinery(code.co_filename)]

    def clear(self) -> None:
        self._ids.clear()
        self._keys.clear()
