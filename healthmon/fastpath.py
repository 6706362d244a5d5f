"""The monitor's eager hot path in C++ (``healthmon._C.FastPath``, ``csrc/fast_path.cpp``).

A watched module's forward hook first offers its output to the fast path: when the module's
call returned one plain tensor (or a flat tuple of them) of the dtype and device of its cached
sites,
from the same user frames as the cached stack, C++ records it, appends its order entry,
registers a C++ node pre-hook for its gradient and marks it seen, with no Python bytecode.
Anything else falls through to :meth:`Monitor._on_forward` (which primes the cache here for
the next step). An output that compiled code recorded carries the marker
:data:`healthmon.traced.MARK` and is skipped, as in Python (``FastPath.set_marker``, set when
the first compiled record is traced; sync mode then keeps the Python hooks, which check the
compiled rows). The fast path works on the monitor's own per-step objects (order list, call
counts, seen dict, Step), handed over at every step boundary, so both paths interleave in
one execution order and the records and findings are the same.

Sync mode on the CPU takes it too: C++ reads each record's NaN / Inf counts and hands only
a flagged one to :meth:`Monitor._check_now` (which reports and may raise, as in Python).

Parameter gradients: ``healthmon._C.ParamGradHooks`` (``csrc/param_hooks.cpp``) takes each
watched parameter's post-accumulate-grad slot. In async mode it notes which parameters got a
gradient and calls :meth:`Monitor._flush_param_grads` once when the backward ends (one Python
call per backward instead of one per parameter); otherwise, and for compiled autograd, it
hands over to the monitor's Python :class:`~healthmon.hooks.ParamHook`.

``HEALTHMON_FASTPATH=0`` keeps everything in Python (for benchmarks and bisecting).
"""
from __future__ import annotations

import os
import weakref
from collections import OrderedDict

from . import ops


def enabled() -> bool:
    """Whether the C++ hot path is in use: the extension is built and
    ``HEALTHMON_FASTPATH`` is not ``0`` / ``off``."""
    return ops.extension_available() and \
        os.environ.get("HEALTHMON_FASTPATH", "").strip() not in ("0", "off")


def create(mon):
    """A ``FastPath`` for monitor ``mon``, or None (no extension, or switched off)."""
    if not enabled():
        return None
    from . import _C
    ref = weakref.ref(mon)  # the C++ side must not keep the monitor alive

    def grad_fallback(index: int, call: int, part: int, sid: int, grad) -> None:
        m = ref()
        if m is not None:
            m._grad_fallback(index, call, part, sid, grad)

    def check_now(site, sid: int) -> None:
        m = ref()
        if m is not None:
            m._check_now(site, sid)

    fast = _C.FastPath(0, grad_fallback, mon._mod_stack, bool(mon.config.sync), check_now)
    fast.begin_step(mon._cur.order, mon._calls, mon._seen, mon._cur, True)
    mon._fast_primed = {}
    return fast


def prime_forward(mon, index: int, call: int, site, sid: int, part: int = 0,
                  nparts: int = 0) -> None:
    """Call ``call`` of module ``index`` recorded its output (``nparts`` 0: one tensor;
    else item ``part`` of a tuple of ``nparts``) at ``site`` with stack ``sid`` (slow path):
    the fast path takes that call from the same place in the next steps."""
    primed = (site, sid, nparts, site.dtype)  # (a site's dtype changes with model.half())
    if mon._fast_primed.get((index, call, part)) == primed:
        return
    start, frames = mon._stacks.recheck_frames(sid)
    mon._fast.prime_forward(index, call, part, nparts, site, site.buffer, site.slot,
                            site.dtype, site.device, sid, start, frames)
    mon._fast_primed[(index, call, part)] = primed


def prime_backward(mon, index: int, call: int, site, part: int = 0) -> None:
    """The gradient site of call ``call`` of module ``index``'s output (item ``part`` of a
    tuple output)."""
    mon._fast.prime_backward(index, call, part, site, site.buffer, site.slot, site.dtype,
                             site.device)


def create_param_plan(params, grads: bool, pindexes, tensors, groups, sites, modules):
    """A ``ParamPlan`` (``csrc/param_plan.cpp``): parameters ``pindexes`` of ``params``
    (their ``.grad`` when ``grads``), recorded as ``tensors`` are now; ``groups``:
    ``(buffer index, positions, slots)``; ``sites`` / ``modules``: each position's order
    entry."""
    from . import _C
    return _C.ParamPlan(params, grads, list(pindexes), tensors, groups, sites, modules)


def create_param_hooks(mon):
    """A ``ParamGradHooks`` for monitor ``mon`` (held weakly by its end-of-backward call)."""
    from . import _C
    ref = weakref.ref(mon)

    def flush(pindexes) -> None:
        m = ref()
        if m is not None:
            m._flush_param_grads(pindexes)

    return _C.ParamGradHooks(flush)


def install_param_hook(mon, param, hook) -> None:
    """Hook watched parameter ``hook.index`` in C++ (``hook``: its Python ParamHook)."""
    if param._post_accumulate_grad_hooks is None:
        # torch installs its dict hook in the slot on the first Python registration; made
        # now, the user's later hooks join that dict (wrapped by ours) instead of replacing us
        param._post_accumulate_grad_hooks = OrderedDict()
    mon._param_hook_objs.append(hook)  # the C++ hook holds it weakly
    mon._param_hooks.install(param, hook.index, hook)
