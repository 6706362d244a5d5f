"""A Dynamo bug that the traced gradient hooks trigger, and its fix while a monitor is attached.

Dynamo traces the body of ``Tensor.register_hook`` on an intermediate tensor in a speculative
subgraph and then puts back a copy of its side-effects table (``speculate_subgraph(...,
restore_side_effects=True)``). Dynamo's proxy of an object's ``__dict__``
(``SideEffectsProxyDict``, torch 2.13) keeps the table that was current when the proxy was
made. So an object whose ``__dict__`` Dynamo read before one of our hooks and that is mutated
after it (transformers' ``DynamicLayer``: ``self.device = ...`` then ``self.device``) writes
into the table Dynamo threw away, reads ``AttributeError`` back, and Dynamo runs the frames
around it eagerly: a watched GPT-2 compiled to 9 graphs where the unwatched one needs 2.

Upstream fixed it the same way (pytorch/pytorch#195954: the proxy looks the table up
through its ``OutputGraph`` on each access). Where the installed torch already does, or has
no such class, :func:`install` changes nothing. Installed while any monitor is attached,
removed with the last one (see :func:`healthmon.traced.guard_hooks`).
"""
from __future__ import annotations

from typing import Optional

_GRAPH = "_healthmon_output_graph"  # instance attribute: weakref to the proxy's OutputGraph


class _CurrentSideEffects:
    """Data descriptor for ``SideEffectsProxyDict.side_effects``: Dynamo's ``__init__``
    assigns the table current at construction; reads return the table its output graph
    holds now. The assigned table is kept too, as the fallback when the graph is gone and
    for proxies still alive after :func:`uninstall`."""

    def __set__(self, proxy, side_effects) -> None:
        proxy.__dict__["side_effects"] = side_effects
        graph_ref = getattr(side_effects, "output_graph_weakref", None)
        if graph_ref is not None:
            proxy.__dict__[_GRAPH] = graph_ref

    def __get__(self, proxy, owner=None):
        if proxy is None:
            return self
        graph_ref = proxy.__dict__.get(_GRAPH)
        graph = graph_ref() if graph_ref is not None else None
        current = getattr(graph, "side_effects", None) if graph is not None else None
        return current if current is not None else proxy.__dict__["side_effects"]


def _proxy_class() -> Optional[type]:
    """The installed torch's ``SideEffectsProxyDict`` if it has the snapshot bug, else None."""
    try:
        from torch._dynamo.variables.dicts import SideEffectsProxyDict
    except Exception:  # another torch: nothing of this shape to fix
        return None
    current = SideEffectsProxyDict.__dict__.get("side_effects")
    if current is not None and not isinstance(current, _CurrentSideEffects):
        return None  # the class defines the attribute itself (fixed upstream)
    if SideEffectsProxyDict.__dictoffset__ == 0:
        return None  # no instance __dict__ (slots): not the class this fix knows
    return SideEffectsProxyDict


def install() -> bool:
    """Make Dynamo's ``__dict__`` proxies read the current side-effects table.

    Returns:
        True when the descriptor is in place (now or already), False when the installed
        torch needs no fix.
    """
    cls = _proxy_class()
    if cls is None:
        return False
    if not isinstance(cls.__dict__.get("side_effects"), _CurrentSideEffects):
        cls.side_effects = _CurrentSideEffects()
    return True


def uninstall() -> None:
    """Put Dynamo's class back as it was (proxies alive now keep their assigned table)."""
    cls = _proxy_class()
    if cls is not None and isinstance(cls.__dict__.get("side_effects"), _CurrentSideEffects):
        del cls.side_effects


def installed() -> bool:
    cls = _proxy_class()
    return cls is not None and isinstance(cls.__dict__.get("side_effects"), _CurrentSideEffects)
