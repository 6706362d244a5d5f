"""An Inductor graph pass: a compiled graph's small records in one native call.

Under ``torch.compile`` each record is a ``healthmon::record_to`` call in Inductor's Python
wrapper code, about 1.3 us each on the CPU (a Python op call through the dispatcher), which a
model of many tiny layers cannot hide: the 50-block deep stack makes 202 of them per step.
This pass, run on Inductor's post-grad graphs (forward and backward apart), replaces each
run of consecutive small records by one ``healthmon::multi_record_to`` call.

Merging moves a record later in the graph, so its tensor lives until the merged call and is
read there. Hence:
* only tensors of at most :data:`SMALL_BYTES` are merged, and a group holds at most
  :data:`GROUP_BYTES` (the most memory a group keeps alive: large tensors, whose kernel
  time dwarfs a call's, keep their own record where they were);
* a group is closed before any node that mutates a tensor or has another side effect (a
  record must read the values the tensor had at its own place), and at the graph's end;
* shapes that are not concrete (dynamic shapes) are not merged.
The records and the findings are those of the unmerged graph (tests/test_compile_pass.py).

Added to ``torch._inductor.config.post_grad_custom_post_pass`` while a monitor is attached,
after any pass the user set there (kept, and run first), removed with the last monitor (see
:func:`healthmon.traced.guard_hooks`).
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

SMALL_BYTES = 64 * 1024  # a tensor merged when at most this size
GROUP_BYTES = 1024 * 1024  # the most a group of merged records keeps alive


def _record_op():
    """``healthmon::record_to``, or None without the native extension (or with a build
    older than ``multi_record_to``)."""
    lib = torch.ops.healthmon
    if not (hasattr(lib, "record_to") and hasattr(lib, "multi_record_to")):
        return None
    return lib.record_to.default


def _small_bytes(node: torch.fx.Node) -> Optional[int]:
    """Bytes of a record's tensor if it may be merged (concrete and small), else None."""
    val = node.args[0].meta.get("val") if isinstance(node.args[0], torch.fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    numel = val.numel()
    if not isinstance(numel, int):  # a symbolic size
        return None
    size = numel * val.element_size()
    return size if size <= SMALL_BYTES else None


def _is_barrier(node: torch.fx.Node) -> bool:
    """A node a record must not move past: one that mutates or has side effects."""
    if node.op == "output":
        return True
    if node.op != "call_function":
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable or node.is_impure()
    return node.is_impure()


def merge_records(graph: torch.fx.Graph) -> int:
    """Merge runs of small ``record_to`` nodes of ``graph`` in place.

    Returns:
        how many ``record_to`` nodes were merged away (0: the graph is unchanged).
    """
    record = _record_op()
    if record is None:
        return 0
    merged = 0
    group: List[torch.fx.Node] = []
    pending = 0

    def close() -> None:
        nonlocal group, pending, merged
        if len(group) > 1:
            with graph.inserting_after(group[-1]):
                graph.call_function(
                    torch.ops.healthmon.multi_record_to.default,
                    ([n.args[0] for n in group], [n.args[1] for n in group],
                     [n.args[2] for n in group]))
            for n in group:
                graph.erase_node(n)
            merged += len(group)
        group, pending = [], 0

    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is record:
            size = _small_bytes(node)
            if size is None:
                continue  # recorded where it is; reading a tensor moves nothing else
            if pending + size > GROUP_BYTES:
                close()
            group.append(node)
            pending += size
        elif _is_barrier(node):
            close()
    close()
    return merged


class MergeRecords(CustomGraphPass):
    """:func:`merge_records` as an Inductor post-grad pass (its uuid keys Inductor's cache)."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        merge_records(graph)

    def uuid(self):
        return (get_hash_for_files((__file__,)).hex(), SMALL_BYTES, GROUP_BYTES)


_PASS = MergeRecords()
_SAVED: list = []  # the config's value before install, while installed


def _passes(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else \
        ([] if value is None else [value])


def install() -> None:
    """Add the pass to Inductor's config, after the passes already there (kept, and each
    keyed or bypassed by Inductor's cache as before)."""
    from torch._inductor import config
    if _SAVED or _record_op() is None:
        return
    _SAVED.append(config.post_grad_custom_post_pass)
    config.post_grad_custom_post_pass = _passes(_SAVED[0]) + [_PASS]


def uninstall() -> None:
    """Take the pass out of Inductor's config: the value from before :func:`install` if
    nobody changed it meanwhile, else whatever is there now without our pass."""
    from torch._inductor import config
    if not _SAVED:
        return
    saved = _SAVED.pop()
    now = config.post_grad_custom_post_pass
    if isinstance(now, list) and now == _passes(saved) + [_PASS]:
        config.post_grad_custom_post_pass = saved
    elif _PASS in _passes(now):
        rest = [p for p in _passes(now) if p is not _PASS]
        config.post_grad_custom_post_pass = rest or None


def installed() -> bool:
    from torch._inductor import config
    return _PASS in _passes(config.post_grad_custom_post_pass)
