"""decode.ViewMemo: a steady loop's merged execution order is reused, never stale."""
from __future__ import annotations

from healthmon import decode
from healthmon.records import Site


def _site(name, phase, seq, compiled=False):
    return Site(name, phase, "output", 0, 0, "cpu", seq, False, compiled=compiled, seq=seq)


def test_view_memo_reuses_the_merge_only_for_the_same_inputs():
    inp, loss = _site("<input>", "input", 0), _site("<loss>", "loss", 1)
    fwd = [_site(f"f{i}", "forward", 2 + i, compiled=True) for i in range(3)]
    bwd = [_site(f"b{i}", "backward", 5 + i, compiled=True) for i in range(3)]
    order = [(inp, 7), (loss, 8)]
    memo = decode.ViewMemo()
    first = memo.merged(order, fwd + bwd)
    assert first == decode.merged_view(order, fwd + bwd)
    assert first[0] is inp and first[1:4] == fwd and first[4] is loss
    # the next step: equal lists (new list objects), the same view object
    assert memo.merged(list(order), list(fwd + bwd)) is first
    # a compiled row not written this time, or another eager record: merged again
    fewer = memo.merged(order, fwd + bwd[:2])
    assert fewer == decode.merged_view(order, fwd + bwd[:2]) and bwd[2] not in fewer
    other_stack = memo.merged([(inp, 7), (loss, 9)], fwd + bwd[:2])
    assert other_stack == fewer and other_stack is not fewer
