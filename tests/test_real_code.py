"""Real training code outside the monitor core (issue 12; issue 13 item 7): op hygiene and
torch.func (vmap / grad / jacrev), tensor-subclass outputs, failing sinks, small API edges,
additive attention masks, embedding index checks."""
from __future__ import annotations

import functools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import healthmon
from healthmon import ops
from healthmon._layout import NUM_STATS

needs_ext = pytest.mark.skipif(not ops.extension_available(),
                               reason="native extension not built (make build)")
OPS = ("stats", "stats_into", "multi_stats", "multi_stats_into", "label_check",
       "label_sanitize")


# ----------------------------------------------------------------------------- op hygiene

def _op_calls(x):
    records = torch.zeros(4, NUM_STATS, dtype=torch.float64)
    target = torch.tensor([[0, 3, 9], [-100, 2, -1]])
    return {
        "stats": (x,),
        "stats_into": (x, records, 1),
        "multi_stats": ([x, x[0]],),
        "multi_stats_into": ([x, x[:1]], records, [3, 0]),
        "label_check": (target, 8, -100),
        "label_sanitize": (target, 8, -100),
    }


def opcheck_nan_aware(op, args):
    """``torch.library.opcheck``, except that the eager-vs-AOTDispatcher comparison treats
    NaN == NaN: min / max of an input without finite values are NaN by definition, and
    opcheck's own comparison (``assert_close`` without ``equal_nan``) calls that a difference."""
    from torch.testing._internal.optests import aot_autograd_check
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration",
                                                "test_faketensor"))
    aot_autograd_check(op, args, {}, dynamic=True, check_gradients=False,
                       assert_equals_fn=functools.partial(torch.testing.assert_close,
                                                          equal_nan=True))


@needs_ext
@pytest.mark.parametrize("fill", ["all_nan", "mixed"])
@pytest.mark.parametrize("name", OPS)
def test_opcheck_every_op_nan_aware(name, fill):
    x = torch.full((3, 5), math.nan) if fill == "all_nan" else torch.randn(3, 5)
    if fill == "mixed":
        x[1, 2] = math.inf
    opcheck_nan_aware(getattr(torch.ops.healthmon, name).default, _op_calls(x)[name])


@needs_ext
def test_plain_opcheck_reports_a_false_difference_on_all_nan_input():
    """Why the NaN-aware check exists: plain opcheck fails on an op that is right."""
    x = torch.full((4,), math.nan)
    result = torch.library.opcheck(torch.ops.healthmon.stats.default, (x,),
                                   raise_exception=False)
    assert result["test_aot_dispatch_dynamic"] != "SUCCESS"
    assert torch.ops.healthmon.stats(x)[1].item() == 4  # 4 NaN counted: the op is right


@needs_ext
@pytest.mark.parametrize("name", OPS)
def test_ops_are_non_differentiable_without_warning(name):
    x = torch.randn(3, 5, requires_grad=True)
    args = _op_calls(x)[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the autograd fallback's deprecation warning
        out = getattr(torch.ops.healthmon, name)(*args)
        outs = out if isinstance(out, (tuple, list)) else [out]
        assert not any(o.requires_grad for o in outs if isinstance(o, torch.Tensor))
        (x * 2).sum().backward()  # a graph that holds the op's input backprops quietly
        torch.library.opcheck(getattr(torch.ops.healthmon, name).default, args,
                              test_utils=("test_autograd_registration",))
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"healthmon::{name}", "Autograd")


# ----------------------------------------------------------------------------- torch.func

@needs_ext
def test_vmap_of_the_pure_ops_is_per_sample():
    x = torch.randn(6, 4, 3)
    x[2, 1, 1] = math.nan
    got = torch.func.vmap(ops.stats_record)(x)
    want = torch.stack([ops.stats_record(s) for s in x])
    torch.testing.assert_close(got, want, equal_nan=True)
    got = torch.func.vmap(ops.multi_stats, in_dims=([1, None],))([x, x[0]])
    want = torch.stack([ops.multi_stats([x[:, b], x[0]]) for b in range(4)])
    torch.testing.assert_close(got, want, equal_nan=True)


@needs_ext
def test_vmap_record_ops_write_the_stats_of_every_sample():
    x = torch.randn(5, 7)
    x[3, 0] = math.nan
    records = torch.zeros(2, NUM_STATS, dtype=torch.float64)
    torch.func.vmap(lambda s: ops.stats_into(s, records, 1) or s)(x)
    torch.testing.assert_close(records[1], ops.stats_record(x), equal_nan=True)
    target = torch.tensor([[0, 1], [2, 9]])
    rec = torch.func.vmap(lambda t: ops.label_record(t, 3), out_dims=None)(target)
    torch.testing.assert_close(rec, ops.label_record(target, 3))
    with pytest.raises(ValueError, match="unbatched"):
        torch.func.vmap(lambda s, r: ops.stats_into(s, r, 0) or s)(
            x, torch.zeros(5, 1, NUM_STATS, dtype=torch.float64))


def _per_sample_setup(bad_label=None, nan_sample=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(5, 4)
    y = torch.tensor([0, 1, 2, 1, 0])
    if bad_label is not None:
        y[3] = bad_label
    if nan_sample is not None:
        x[nan_sample, 1] = math.nan

    def loss(p, xs, ys):
        out = torch.func.functional_call(model, p, (xs.unsqueeze(0),))
        return F.cross_entropy(out, ys.unsqueeze(0))
    return model, params, x, y, loss


@needs_ext
def test_per_sample_gradients_with_vmap_grad_over_a_watched_model():
    model, params, x, y, loss = _per_sample_setup()
    want = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    with healthmon.watch(model) as mon:
        got = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
        mon.check()
        rows = {(r["site"], r["phase"]): r for r in mon.records()}
    for k in want:
        assert torch.equal(got[k], want[k])  # the monitor changes nothing
    assert rows[("<input>", "input")]["numel"] == x.numel()  # every sample in one record
    assert rows[("0", "forward")]["numel"] == 5 * 8
    assert ("2", "backward") in rows
    assert not mon.anomalies


@needs_ext
def test_vmap_grad_finds_a_nan_sample_and_a_bad_label():
    model, params, x, y, loss = _per_sample_setup(nan_sample=2)
    with healthmon.watch(model) as mon:
        with pytest.raises(healthmon.HealthError) as err:
            torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
            mon.check()
    assert err.value.anomaly.site == "<input>" and err.value.anomaly.kind == "nan"
    model, params, x, y, loss = _per_sample_setup(bad_label=7)
    with healthmon.watch(model):
        with pytest.raises(healthmon.HealthError) as err:
            torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    stats = err.value.anomaly.stats
    assert stats.bad == 1 and stats.bad_values == ((7, 1),)
    assert stats.first_bad_index == (3, 0)  # sample 3 of the vmapped batch


@needs_ext
def test_grad_and_jacrev_over_a_watched_model():
    model, params, x, y, loss = _per_sample_setup()
    want_g = torch.func.grad(loss)(params, x[0], y[0])
    want_j = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    with healthmon.watch(model) as mon:
        g = torch.func.grad(loss)(params, x[0], y[0])
        j = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
        mon.check()
    for k in want_g:
        assert torch.equal(g[k], want_g[k]) and torch.equal(j[k], want_j[k])
    assert not mon.anomalies
