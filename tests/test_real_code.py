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


# ----------------------------------------------------------------------------- failing sinks

class _DiskFull:
    """A file object whose writes fail like a full disk."""

    def __init__(self):
        self.closed = False

    def write(self, data):
        raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")

    def fileno(self):
        raise OSError(9, "Bad file descriptor")

    def close(self):
        self.closed = True


def _nan_steps(model, opt, steps, nan_at=None):
    for i in range(steps):
        x = torch.randn(4, 3)
        if i == nan_at:
            x[0, 0] = math.nan
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()


def test_a_log_whose_writes_fail_warns_once_and_monitoring_goes_on(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = healthmon.watch(model, log=tmp_path / "run.jsonl")
    sink = mon.sinks[-1]
    sink._file = _DiskFull()  # the disk fills up after the log was opened
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _nan_steps(model, opt, 3)
        with pytest.raises(healthmon.HealthError):  # anomalies are still raised, not OSError
            _nan_steps(model, opt, 2, nan_at=1)
        mon.remove()
    mine = [w for w in caught if "run.jsonl" in str(w.message)]
    assert len(mine) == 1, [str(w.message) for w in caught]
    assert "No space left on device" in str(mine[0].message)
    assert isinstance(sink.failed, OSError)
    assert mon.anomalies and mon.anomalies[0].kind == "nan"


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full")
def test_log_on_dev_full_never_raises_out_of_the_loop():
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = healthmon.watch(model, log="/dev/full", on_anomaly="warn")
        _nan_steps(model, opt, 3, nan_at=1)  # the anomaly's flush + fsync hits ENOSPC
        mon.remove()
    texts = [str(w.message) for w in caught]
    assert sum("'/dev/full'" in t and "failed" in t for t in texts) == 1, texts
    assert mon.anomalies[0].step == 1 and mon.anomalies[0].kind == "nan"


# ----------------------------------------------------------------------------- small edges

def test_uint64_labels_above_2_63_show_as_unsigned_values():
    big = 2 ** 64 - 100  # reads as -100 (== ignore_index) once cast to int64
    target = torch.tensor([2 ** 63 + 5, 1, big], dtype=torch.uint64)
    with pytest.raises(healthmon.HealthError) as err:
        healthmon.check_labels(target, 4)
    stats = err.value.anomaly.stats
    assert stats.bad == 2
    assert dict(stats.bad_values) == {2 ** 63 + 5: 1, big: 1}
    assert "-" not in str(stats.bad_values)


def test_meta_target_and_huge_num_classes_get_clear_errors():
    with pytest.raises(ValueError, match="meta tensor"):
        healthmon.check_labels(torch.zeros(3, dtype=torch.int64, device="meta"), 4)
    with pytest.raises(ValueError, match="int64"):
        healthmon.check_labels(torch.zeros(3, dtype=torch.int64), 2 ** 70)
    with pytest.raises(ValueError, match="int64"):
        ops.label_record(torch.zeros(3, dtype=torch.int64), 2 ** 70)


def test_meta_loss_in_a_watched_step_passes_through():
    """Shape inference on the meta device inside a monitored step: torch computes it, the
    monitor skips it (counted) and the step boundary decodes cleanly."""
    model = nn.Linear(4, 3)
    with healthmon.watch(model) as mon:
        model(torch.randn(2, 4))
        out = F.cross_entropy(torch.randn(2, 3, device="meta"),
                              torch.zeros(2, dtype=torch.int64, device="meta"))
        assert out.device.type == "meta"
        mon.check()
    assert mon.skipped.get("meta / fake tensors have no data") == 1


def test_multi_stats_of_an_empty_list_is_empty():
    out = ops.multi_stats([])
    assert out.shape == (0, NUM_STATS) and out.dtype == torch.float64


def test_log_naming_a_directory_is_a_clear_value_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HEALTHMON_LOG", str(tmp_path))
    with pytest.raises(ValueError, match="HEALTHMON_LOG.*is a directory"):
        healthmon.watch(nn.Linear(2, 2))
    monkeypatch.delenv("HEALTHMON_LOG")
    with pytest.raises(ValueError, match="log=.*is a directory"):
        healthmon.watch(nn.Linear(2, 2), log=tmp_path)


# ----------------------------------------------------------------------------- masks

class _MaskedLM(nn.Module):
    """Embedding, a causal TransformerEncoder and a head; the mask is an input."""

    def __init__(self, vocab=11, d=16):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids, mask):
        return self.head(self.encoder(self.emb(ids), mask=mask))


def _mask_steps(model, mask, steps=2, **watch_kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with healthmon.watch(model, **watch_kwargs) as mon:
        for _ in range(steps):
            ids = torch.randint(0, 11, (2, mask.shape[0]))
            loss = F.cross_entropy(model(ids, mask).flatten(0, 1), ids.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


@pytest.mark.parametrize("sync", [False, True])
def test_causal_mask_into_the_root_and_an_inner_encoder_is_not_an_anomaly(sync):
    torch.manual_seed(0)
    mask = nn.Transformer.generate_square_subsequent_mask(5)

    class Inner(nn.Module):  # the mask is made inside the model and passed to the encoder
        def __init__(self):
            super().__init__()
            self.lm = _MaskedLM()
            self.causal = _MakeMask()

        def forward(self, ids):
            return self.lm(ids, self.causal(ids.shape[1]))

    mon = _mask_steps(_MaskedLM(), mask, sync=sync)
    assert not mon.anomalies
    model = Inner()
    with healthmon.watch(model, sync=sync) as mon:
        model(torch.randint(0, 11, (2, 5))).sum().backward()
    assert not mon.anomalies
    assert any(r["site"] == "causal" and r["neginf"] == 10 for r in mon.records())


class _MakeMask(nn.Module):
    def forward(self, n):
        return nn.Transformer.generate_square_subsequent_mask(n)


@pytest.mark.parametrize("bad", ["nan", "posinf", "neginf_next_to_finite"])
def test_masks_that_are_not_pure_zero_minus_inf_stay_anomalies(bad):
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    value = {"nan": math.nan, "posinf": math.inf, "neginf_next_to_finite": 0.5}[bad]
    mask[2, 1] = value
    with pytest.raises(healthmon.HealthError) as err:
        _mask_steps(_MaskedLM(), mask)
    a = err.value.anomaly
    assert (a.site, a.phase, a.role) == ("<input>", "input", "input[1]")
    if bad != "nan":
        text = str(err.value)
        assert 'allow_inf=["<input>.input[1]"]' in text
        assert "HEALTHMON_ALLOW_INF='<input>.input[1]'" in text


def test_allow_inf_from_the_environment_and_the_argument_are_merged(monkeypatch):
    mask = nn.Transformer.generate_square_subsequent_mask(5)
    mask[2, 1] = 0.5  # a mask with a nonzero finite bias: needs a pattern
    monkeypatch.setenv("HEALTHMON_ALLOW_INF", " nothing.* , <input>.input[[]1]")
    mon = _mask_steps(_MaskedLM(), mask)
    assert not mon.anomalies
    assert mon.config.allow_inf == ("nothing.*", "<input>.input[[]1]")
    monkeypatch.setenv("HEALTHMON_ALLOW_INF", "nothing.*")
    mon = _mask_steps(_MaskedLM(), mask, allow_inf=["<input>.*"])
    assert not mon.anomalies and mon.config.allow_inf == ("<input>.*", "nothing.*")


MASK_SCRIPT = """\
import torch
from torch import nn


class M(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x, bias):
        return (self.lin(x) + bias).softmax(-1)


bias = nn.Transformer.generate_square_subsequent_mask(5)
bias[2, 1] = 0.5  # an additive bias with a nonzero finite value: needs a pattern
m = M()
for _ in range(3):
    m(torch.randn(5, 5), bias).sum().backward()
print("done")
"""


def test_run_allow_inf_option(tmp_path, capsys):
    from healthmon.__main__ import main
    script = tmp_path / "train.py"
    script.write_text(MASK_SCRIPT)
    assert main(["run", "-q", str(script)]) == 1
    assert "--allow-inf '<input>.input[1]'" in capsys.readouterr().err
    assert main(["run", "-q", "--allow-inf", "nothing", "--allow-inf", "<input>.input?1?",
                 str(script)]) == 0
    assert "done" in capsys.readouterr().out


# ----------------------------------------------------------------------------- subclasses

def _two(a, b):
    from torch.testing._internal.two_tensor import TwoTensor
    return TwoTensor(a, b)


def test_wrapper_subclass_is_recorded_by_its_inner_tensors():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    bad = x.clone()
    bad[1, 1] = math.nan  # only in the FIRST inner tensor: last-one-wins would hide it
    with healthmon.watch(model) as mon:
        model(_two(x, x.clone())).sum().backward()
        mon.check()
        roles = {(r["site"], r["phase"], r["role"]) for r in mon.records()}
        assert {("<input>", "input", "input[0].a"), ("<input>", "input", "input[0].b"),
                ("<model>", "forward", "output.a"), ("<model>", "forward", "output.b")} <= roles
        assert not any(r["role"] in ("input[0]", "output") for r in mon.records())
        with pytest.raises(healthmon.HealthError) as err:
            model(_two(bad, x.clone())).sum().backward()
            mon.check()
    a = err.value.anomaly
    assert (a.site, a.phase, a.role, a.stats.nan) == ("<input>", "input", "input[0].a", 1)


def test_wrapper_subclass_gradient_and_parameter_rows():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    w = model.weight.detach()
    model.weight = nn.Parameter(_two(w.clone(), w.clone()))
    with healthmon.watch(model) as mon:
        model(torch.randn(4, 3)).sum().backward()
        mon.check()
    roles = {(r["phase"], r["role"]) for r in mon.records()}
    assert {("grad", "weight.a"), ("grad", "weight.b"), ("param", "weight.a"),
            ("param", "weight.b"), ("backward", "grad_output.a")} <= roles
    assert not mon.anomalies


def test_dispatch_subclass_without_flatten_is_skipped_with_a_reason():
    class Opaque(torch.Tensor):
        @staticmethod
        def __new__(cls, inner):
            return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype)

        def __init__(self, inner):
            self.inner = inner

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            unwrap = lambda t: t.inner if isinstance(t, Opaque) else t  # noqa: E731
            args = torch.utils._pytree.tree_map(unwrap, args)
            kwargs = torch.utils._pytree.tree_map(unwrap, kwargs or {})
            return func(*args, **kwargs)

    class Id(nn.Module):
        def forward(self, x):
            return torch.ones(1)  # the opaque input only

    model = Id()
    with healthmon.watch(model) as mon:
        model(Opaque(torch.tensor([math.nan, 1.0])))
        mon.check()
    assert any("Opaque" in reason and "__tensor_flatten__" in reason for reason in mon.skipped)
    assert not mon.anomalies and all(r["role"] != "input[0]" for r in mon.records())


# ----------------------------------------------------------------------------- embeddings

class _TokenLM(nn.Module):
    def __init__(self, vocab=10, d=4, padding_idx=None, functional=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.head = nn.Linear(d, vocab)
        self.functional = functional

    def forward(self, ids):
        if self.functional:
            return self.head(F.embedding(ids, self.emb.weight))
        return self.head(self.emb(ids))


def _bad_ids():
    ids = torch.randint(1, 10, (2, 6))
    ids[0, 5] = 12
    ids[1, 3] = 12
    ids[1, 4] = 10
    return ids


@pytest.mark.parametrize("sync", [False, True])
@pytest.mark.parametrize("functional", [False, True])
def test_out_of_range_token_ids_are_a_health_error(functional, sync):
    model = _TokenLM(functional=functional)
    with healthmon.watch(model, sync=sync):
        with pytest.raises(healthmon.HealthError) as err:
            model(_bad_ids())
    a = err.value.anomaly
    assert (a.site, a.phase, a.role, a.kind) == ("embedding", "label", "indices", "index")
    s = a.stats
    assert (s.bad, s.numel, s.num_classes) == (3, 12, 10)
    assert s.bad_values == ((12, 2), (10, 1)) and s.first_bad_index == (0, 5)
    text = str(err.value)
    assert "out-of-range embedding indices" in text and "labels" not in text
    assert "3 of 12 indices outside [0, 10)" in text and "(batch 0, position 5)" in text
    assert "vocabulary is larger than the model's" in text and "num_embeddings >= 13" in text
    assert "test_real_code.py" in text  # the user's line that called the embedding


def test_negative_ids_get_their_own_hint_and_padding_idx_is_valid():
    model = _TokenLM(padding_idx=-1)  # row 9 after F.embedding's normalisation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with healthmon.watch(model) as mon:
        for _ in range(3):
            ids = torch.randint(0, 10, (2, 6))
            ids[:, -2:] = 9  # padding
            opt.zero_grad()
            F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
            opt.step()
        mon.check()
        ids[0, 0] = -1
        with pytest.raises(healthmon.HealthError) as err:
            model(ids)
    assert not mon.anomalies[:-1]
    assert err.value.anomaly.stats.bad_values == ((-1, 1),)
    assert "negative id -1" in str(err.value) and "padding_idx" in str(err.value)


def test_async_accelerator_path_sanitises_the_indices_and_reports_at_the_boundary(monkeypatch):
    """As on a GPU in async mode: no check at the call (no host sync), the lookup gets a
    copy with bad ids sent to the padding row (no device assert can fire), and the report
    comes at the step boundary with the stack of the call."""
    from healthmon import labels
    monkeypatch.setattr(labels, "SYNC_CHECK_DEVICES", ())
    model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0))
    ids = _bad_ids()
    with healthmon.watch(model) as mon:
        out = model(ids)  # torch would raise IndexError here
        assert torch.equal(out[0, 5], model[0].weight[0].detach())  # the padding row
        with pytest.raises(healthmon.HealthError) as err:
            mon.check()
    a = err.value.anomaly
    assert (a.kind, a.role, a.stats.bad) == ("index", "indices", 3)
    assert "vocabulary is larger" in str(err.value)


def test_embedding_guard_is_refcounted_and_fully_removed():
    from healthmon import labels
    original = torch.embedding
    m1, m2 = _TokenLM(), _TokenLM()
    mon1, mon2 = healthmon.watch(m1), healthmon.watch(m2)
    assert torch.embedding is not original and torch.embedding.__wrapped__ is original
    mon1.remove()
    assert torch.embedding is not original
    mon2.remove()
    assert torch.embedding is original and not labels.loss_guard_installed()
    with pytest.raises(IndexError):  # torch's own behaviour once no monitor is active
        m1(_bad_ids())


def test_a_tensorboard_sink_whose_writes_fail_warns_once():
    class FullWriter:
        log_dir = "runs/full"

        def add_scalar(self, *a, **k):
            raise OSError(28, "No space left on device")

        add_text = add_scalar

        def flush(self):
            raise OSError(28, "No space left on device")

    from healthmon.sinks import TensorBoardSink
    sink = TensorBoardSink(FullWriter())
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with healthmon.watch(model, sinks=[sink], on_anomaly="warn") as mon:
            _nan_steps(model, opt, 3, nan_at=1)
    mine = [str(w.message) for w in caught if "runs/full" in str(w.message)]
    assert len(mine) == 1 and "No space left" in mine[0]
    assert mon.anomalies and mon.anomalies[0].step == 1


@needs_ext
@pytest.mark.parametrize("path", ["warn_at_the_call", "sanitise_async"])
def test_vmap_label_sanitise_paths_give_per_sample_results(path, monkeypatch):
    """A bad label under vmap with on_anomaly="warn" (the loss gets the sanitised target at
    the call) and on the accelerator path (sanitised copy, report at the boundary): the
    per-sample gradients are computed, the bad sample's gradient is zero (ignore_index)."""
    from healthmon import labels
    if path == "sanitise_async":
        monkeypatch.setattr(labels, "SYNC_CHECK_DEVICES", ())
    model, params, x, y, loss = _per_sample_setup(bad_label=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with healthmon.watch(model, on_anomaly="warn") as mon:
            g = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
            mon.check()
    assert [a.kind for a in mon.anomalies] == ["label"]
    assert mon.anomalies[0].stats.bad == 1
    assert torch.equal(g["2.weight"][3], torch.zeros_like(g["2.weight"][3]))
    assert g["2.weight"][0].abs().sum() > 0
