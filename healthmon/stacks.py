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
RECHECK = 2  # user frames compared when a site's cached stack is re-checked


def _is_machinery(filename: str) -> bool:
    """Frames nobody debugs: torch's module-call and hook layers, runpy, healthmon's CLI."""
    name = filename.replace("\\", "/")
    return name.endswith(("/torch/nn/modules/module.py", "/torch/utils/hooks.py",
                          "/torch/_tensor.py", "/healthmon/runner.py",
                          "/healthmon/__main__.py")) or name.startswith("<frozen runpy")


class _CodeRef:
    """A code object by identity, for stack keys: code that Dynamo generates (resume
    functions) can hold a dict among its constants, and such a code object has no hash."""
    __slots__ = ("code", "co_filename", "co_name")

    def __init__(self, code):
        self.code, self.co_filename, self.co_name = code, code.co_filename, code.co_name

    def __hash__(self) -> int:
        return id(self.code)

    def __eq__(self, other) -> bool:
        return isinstance(other, _CodeRef) and other.code is self.code


class StackTable:
    """Interning table of captured stacks (one per monitor)."""

    def __init__(self, max_depth: int = 64, max_stacks: int = 4096):
        self.max_depth = max_depth
        self.max_stacks = max_stacks
        self._ids: Dict[StackKey, int] = {}
        self._keys: List[StackKey] = []
        self._user_start: List[int] = []  # index of each stack's first user frame

    def __len__(self) -> int:
        return len(self._keys)

    def recheck_frames(self, sid: int):
        """What :meth:`capture` compares to reuse stack ``sid``: ``(index of its first user
        frame, [(code, line)] of the :data:`RECHECK` frames from there)``."""
        start = self._user_start[sid]
        return start, list(self._keys[sid][start:start + RECHECK])

    def capture(self, skip: int = 1, hint: int = -1) -> int:
        """Id of the current Python stack, starting ``skip`` frames above the caller.

        ``hint``: the id this call site had last time; when the innermost :data:`RECHECK`
        frames still match it, it is returned without walking the whole stack (the hot
        path: a module called from the same line every step)."""
        if 0 <= hint < len(self._keys):
            # compare the innermost user frames only: the machinery frames in between
            # (torch's module call layers) are the same code every time
            cached, start = self._keys[hint], self._user_start[hint]
            try:
                f = sys._getframe(skip + 1 + start)
            except ValueError:
                f = None
            i, n = start, min(start + RECHECK, len(cached))
            while i < n and f is not None and f.f_code is cached[i][0] \
                    and f.f_lineno == cached[i][1]:
                f, i = f.f_back, i + 1
            if i == n:
                return hint
        frame = sys._getframe(skip + 1)
        key = []
        depth = self.max_depth
        while frame is not None and depth:
            key.append((frame.f_code, frame.f_lineno))
            frame = frame.f_back
            depth -= 1
        key = tuple(key)
        try:
            sid = self._ids.get(key)
        except TypeError:  # a code object Dynamo built holds an unhashable constant
            key = tuple((_CodeRef(code), line) for code, line in key)
            sid = self._ids.get(key)
        if sid is None:
            sid = self._intern(key, next(
                (i for i, (code, _) in enumerate(key) if not _is_machinery(code.co_filename)
                 and not code.co_filename.endswith(("/healthmon/monitor.py",
                                                    "/healthmon/hooks.py"))), 0))
        return sid

    def intern_summary(self, frames) -> int:
        """Id of a stack given as ``(filename, lineno, name)`` triples, innermost first (a
        stack captured while ``torch.compile`` traced the code: see :func:`traced_stack`)."""
        key = tuple((str(f), int(n), str(name)) for f, n, name in frames)[:self.max_depth]
        sid = self._ids.get(key)
        return self._intern(key, 0) if sid is None else sid

    def _intern(self, key: StackKey, user_start: int) -> int:
        """A new id for ``key`` (``_FULL`` once the table holds ``max_stacks``)."""
        if len(self._keys) >= self.max_stacks:
            return _FULL
        sid = len(self._keys)
        self._ids[key] = sid
        self._keys.append(key)
        self._user_start.append(user_start)
        return sid

    def frames(self, sid: int) -> List[traceback.FrameSummary]:
        """The stack ``sid`` as FrameSummary objects, outermost first (like
        ``traceback.extract_stack``); empty for an unknown id."""
        if sid is None or sid < 0 or sid >= len(self._keys):
            return []
        # drop the module-call / hook machinery frames (torch's Module.__call__ layers)
        out = []
        for entry in reversed(self._keys[sid]):
            if isinstance(entry[0], str):  # traced: (filename, lineno, name)
                filename, lineno, name = entry
            else:
                filename, lineno, name = entry[0].co_filename, entry[1], entry[0].co_name
            if not _is_machinery(filename):
                out.append(traceback.FrameSummary(filename, lineno, name))
        return out

    def clear(self) -> None:
        self._ids.clear()
        self._keys.clear()
        self._user_start.clear()


def _is_tracer(filename: str) -> bool:
    name = filename.replace("\\", "/")
    return "/torch/_dynamo/" in name or "/torch/_inductor/" in name or \
        "/torch/_functorch/" in name or "/torch/fx/" in name or name.endswith(
            ("/torch/nn/modules/module.py", "/healthmon/monitor.py", "/healthmon/hooks.py",
             "/healthmon/traced.py",
             "/torch/_tensor.py", "/torch/utils/hooks.py"))


def traced_stack(skip_inner: int = 1):
    """The user's stack while ``torch.compile`` traces: the real frames that called the
    compiled code (outer), then the frames Dynamo is tracing symbolically (inner), as
    ``(filename, lineno, name)`` triples innermost first. ``skip_inner`` traced frames are
    dropped (healthmon's own hook frames). Empty when the tracing context is unavailable.
    Runs at trace time only (it is never part of a graph)."""
    try:
        from torch._guards import TracingContext
        traced = [(fs.filename, fs.lineno, fs.name) for fs in TracingContext.extract_stack()]
    except Exception:  # private API: a torch without it gives no inner frames
        traced = []
    traced = [t for t in traced if not _is_tracer(t[0])]
    outer = []
    frame = sys._getframe(1)
    while frame is not None:
        if not _is_tracer(frame.f_code.co_filename) and \
                not frame.f_code.co_filename.endswith("/healthmon/stacks.py"):
            outer.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    # the outer frames run from the eval-frame machinery down: keep the user's ones only
    return list(reversed(traced)) + outer
