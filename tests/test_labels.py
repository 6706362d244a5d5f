"""Out-of-range label checks: check_labels, check_dataset_labels and the monitor's loss guard."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import healthmon
from healthmon import labels


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)
    yield
    assert not labels.loss_guard_installed(), "a test left the loss guard installed"


def wrapped_uint8_target(seed=0):
    """8 classes, (B, H, W) uint8 segmentation labels; void pixels were 0 and became 255
    after `label -= 1` (the wrap-around bug)."""
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randint(1, 9, (4, 16, 20), generator=gen, dtype=torch.uint8)
    raw[1, 1, 5] = 0
    raw[2, 9, 11] = 0
    raw[0, 0, 0] = 3
    raw -= 1
    return raw


def test_uint8_wraparound_named_counted_located_and_hinted():
    target = wrapped_uint8_target()
    with pytest.raises(healthmon.HealthError) as info:
        healthmon.check_labels(target, 8)
    text = str(info.value)
    s = info.value.anomaly.stats
    assert (s.bad, s.numel, s.max) == (2, 4 * 16 * 20, 255)
    assert s.bad_values == ((255, 2),)
    assert s.first_bad_index == (1, 1, 5)
    assert "2 of 1280 labels outside [0, 8)" in text
    assert "255 (2x)" in text
    assert "(batch 1, row 1, col 5)" in text
    assert "uint8" in text and "wrapped around" in text
    assert "test_labels.py" in text  # the caller's line
    assert info.value.anomaly.phase == "label" and info.value.anomaly.kind == "label"


def test_valid_labels_return_stats_and_empty_is_fine():
    t = torch.tensor([[0, 7, -100], [3, 3, 1]])
    s = healthmon.check_labels(t, 8)
    assert s.ok and (s.numel, s.ignored, s.min, s.max, s.first_bad) == (6, 1, -100, 7, -1)
    e = healthmon.check_labels(torch.empty(0, 5, dtype=torch.int64), 3)
    assert e.ok and e.numel == 0
    assert healthmon.check_labels(torch.tensor(2), 3).ok  # 0-dim target


def test_ignore_index_never_reported_one_based_and_negative_reported():
    t = torch.tensor([5, -1, -1, 2, 0])
    assert healthmon.check_labels(t, 6, ignore_index=-1).ok
    one_based = torch.tensor([1, 2, 3, 3, 2])
    with pytest.raises(healthmon.HealthError, match="1-based") as info:
        healthmon.check_labels(one_based, 3)
    assert info.value.anomaly.stats.bad == 2
    neg = torch.tensor([0, 1, -7, 2], dtype=torch.int64)
    with pytest.raises(healthmon.HealthError, match=r"negative label -7") as info:
        healthmon.check_labels(neg, 3)
    assert info.value.anomaly.stats.first_bad_index == (2,)


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64,
                                   torch.uint8, torch.bool])
def test_every_integer_dtype(dtype):
    t = torch.tensor([0, 1, 1, 0], dtype=dtype)
    assert healthmon.check_labels(t, 2).ok
    if dtype != torch.bool:
        bad = torch.tensor([0, 1, 2, 0], dtype=dtype)
        with pytest.raises(healthmon.HealthError):
            healthmon.check_labels(bad, 2)
    else:
        with pytest.raises(healthmon.HealthError):
            healthmon.check_labels(t, 1)  # True is out of range for one class


def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="Class-probability"):
        healthmon.check_labels(torch.rand(4, 3), 3)
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        healthmon.check_labels(torch.zeros(3, dtype=torch.int64), 0)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        healthmon.check_labels(torch.zeros(3, dtype=torch.int64), 2.0)
    with pytest.raises(TypeError, match="torch.Tensor"):
        healthmon.check_labels([0, 1], 2)
    with pytest.raises(ValueError, match="target.to"):
        healthmon.check_labels(torch.zeros(3, dtype=torch.int64), 2,
                               input=torch.zeros(3, 2, device="meta"))


def test_strided_target():
    base = torch.zeros(6, 10, dtype=torch.int64)
    base[4, 3] = 9
    t = base.t()  # (10, 6), non-contiguous
    with pytest.raises(healthmon.HealthError) as info:
        healthmon.check_labels(t, 5)
    assert info.value.anomaly.stats.first_bad_index == (3, 4)


def test_check_dataset_labels_names_first_offending_sample():
    data = [(torch.randn(3), torch.tensor(i % 4)) for i in range(40)]
    data[27] = (torch.randn(3), torch.tensor(4))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    with pytest.raises(healthmon.HealthError) as info:
        healthmon.check_dataset_labels(loader, 4)
    s = info.value.anomaly.stats
    assert s.first_sample == 27
    assert "dataset sample 27" in str(info.value) and "batch 3" in str(info.value)
    ok = healthmon.check_dataset_labels(loader, 5)
    assert (ok.samples, ok.batches, ok.numel, ok.min, ok.max) == (40, 5, 40, 0, 4)
    dicts = [{"x": torch.randn(2), "labels": torch.tensor([1, 2])} for _ in range(3)]
    assert healthmon.check_dataset_labels(dicts, 3).samples == 6
    assert healthmon.check_dataset_labels(dicts, 3, key=lambda b: b["labels"]).batches == 3
    with pytest.raises(TypeError, match="key="):
        healthmon.check_dataset_labels([object()], 3)


# ----------------------------------------------------------------------------- monitor guard

class Seg(nn.Module):
    def __init__(self, classes=8):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def seg_step(model, target, loss="functional", **kw):
    x = torch.randn(target.shape[0], 3, *target.shape[1:])
    out = model(x)
    if loss == "functional":
        value = F.cross_entropy(out, target.long(), **kw)
    elif loss == "module":
        value = nn.CrossEntropyLoss(**kw)(out, target.long())
    else:
        value = F.nll_loss(F.log_softmax(out, 1), target.long(), **kw)
    value.backward()
    return value


@pytest.mark.parametrize("loss", ["functional", "module", "nll"])
def test_monitor_turns_the_loss_index_error_into_a_health_error(loss):
    model = Seg()
    target = wrapped_uint8_target()
    with pytest.raises(IndexError):  # what torch says on its own
        seg_step(model, target, loss)
    with healthmon.watch(model) as mon:
        with pytest.raises(healthmon.HealthError) as info:
            seg_step(model, target, loss)  # the loss line of this test
        mon.remove()
    a = info.value.anomaly
    assert a.phase == "label" and a.site in ("cross_entropy", "nll_loss")
    assert a.stats.bad == 2 and a.stats.first_bad_index == (1, 1, 5)
    assert "255" in str(info.value) and "uint8" in str(info.value)
    assert any(fr.name == "seg_step" and "test_labels.py" in fr.filename
               for fr in a.user_frames())


def test_guard_respects_ignore_index_and_skips_probability_targets():
    model = Seg(4)
    target = torch.randint(0, 4, (2, 5, 5))
    target[0, 0, :3] = 255
    with healthmon.watch(model) as mon:
        seg_step(model, target, "nll", ignore_index=255)
        out = model(torch.randn(2, 3, 5, 5))
        probs = torch.softmax(torch.randn(2, 4, 5, 5), 1)
        F.cross_entropy(out, probs).backward()
        assert mon.check() == []


def test_guard_uninstalls_completely():
    originals = {n: getattr(torch._C._nn, n) for n in labels._GUARDED}
    m1, m2 = Seg(), nn.Linear(2, 2)
    mon1 = healthmon.watch(m1)
    mon2 = healthmon.watch(m2)
    assert labels.loss_guard_installed()
    mon1.remove()
    assert labels.loss_guard_installed()  # mon2 still live
    mon2.remove()
    assert not labels.loss_guard_installed()
    assert all(getattr(torch._C._nn, n) is f for n, f in originals.items())
    # HEALTHMON=off installs nothing
    import os
    os.environ["HEALTHMON"] = "off"
    try:
        mon = healthmon.watch(Seg())
        assert not labels.loss_guard_installed()
        mon.remove()
    finally:
        del os.environ["HEALTHMON"]


def test_warn_policy_trains_on_with_bad_labels_ignored():
    model = Seg()
    target = wrapped_uint8_target()
    with healthmon.watch(model, on_anomaly="warn") as mon:
        with pytest.warns(RuntimeWarning, match="out-of-range labels"):
            loss = seg_step(model, target)
        assert torch.isfinite(loss)
    assert len(mon.anomalies) == 1


def test_async_sanitise_path_raises_at_step_boundary(monkeypatch):
    """The accelerator path (no host sync at the loss: sanitised target, record decoded at
    the boundary), run on the CPU by treating the CPU like an accelerator."""
    monkeypatch.setattr(labels, "SYNC_CHECK_DEVICES", ())
    model = Seg()
    target = wrapped_uint8_target()
    reads = []
    original = torch.Tensor.tolist

    def tracking(self):
        reads.append(self.shape)
        return original(self)
    with healthmon.watch(model) as mon:
        monkeypatch.setattr(torch.Tensor, "tolist", tracking)
        loss = seg_step(model, target)  # no error at the call: bad labels were ignored
        monkeypatch.setattr(torch.Tensor, "tolist", original)
        assert reads == [] and torch.isfinite(loss)
        with pytest.raises(healthmon.HealthError) as info:
            mon.check()
    a = info.value.anomaly
    assert a.phase == "label" and a.step == 0 and a.stats.bad == 2
    assert a.stats.first_bad_index == (1, 1, 5) and a.stats.max == 255
    assert any(fr.name == "seg_step" for fr in a.user_frames())
    # the loss on the sanitised target equals the loss with those labels ignored
    torch.manual_seed(1)
    m2 = Seg()
    x = torch.randn(4, 3, 16, 20)
    ref = F.cross_entropy(m2(x), target.long().masked_fill(target == 255, -100))
    monkeypatch.setattr(labels, "SYNC_CHECK_DEVICES", ())
    with healthmon.watch(m2, on_anomaly="log"):
        got = F.cross_entropy(m2(x), target.long())
    assert torch.equal(got, ref)


def test_sync_mode_raises_at_the_loss_call():
    model = Seg()
    with healthmon.watch(model, sync=True) as mon:
        with pytest.raises(healthmon.HealthError, match="out-of-range labels") as info:
            seg_step(model, wrapped_uint8_target())
        mon.remove()
    assert info.value.anomaly.step == 0


def test_healthy_labels_in_training_no_anomalies_and_loss_unchanged():
    torch.manual_seed(3)
    model = Seg()
    target = torch.randint(0, 8, (4, 16, 20))
    x = torch.randn(4, 3, 16, 20)
    plain = F.cross_entropy(model(x), target)
    with healthmon.watch(model) as mon:
        for _ in range(3):
            watched = F.cross_entropy(model(x), target)
            watched.backward()
        assert mon.check() == []
    assert torch.equal(plain, watched)


@pytest.mark.skipif(not torch.cuda.is_available() or not healthmon.ops.extension_cuda_available(),
                    reason="needs a CUDA GPU and healthmon built with its CUDA kernels")
def test_cuda_async_label_error_keeps_the_context_alive():
    model = Seg().cuda()
    target = wrapped_uint8_target().cuda()
    with healthmon.watch(model) as mon:
        torch.cuda.set_sync_debug_mode("error")
        try:
            seg_step(model, target)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with pytest.raises(healthmon.HealthError) as info:
            mon.check()
    assert any(fr.name == "seg_step" for fr in info.value.anomaly.user_frames())
    assert (torch.ones(1, device="cuda") + 1).item() == 2


def test_huge_target_over_2_31_elements():
    t = torch.zeros(2, 2**30 + 8, dtype=torch.uint8)
    t[1, 2**30 + 3] = 255
    with pytest.raises(healthmon.HealthError) as info:
        healthmon.check_labels(t, 4)
    s = info.value.anomaly.stats
    assert s.numel == 2**31 + 16 and s.bad == 1
    assert s.first_bad == 2**30 + 8 + 2**30 + 3 and s.first_bad_index == (1, 2**30 + 3)
    del t


def test_guard_reports_to_the_monitor_whose_step_is_open():
    gen, disc = Seg(), Seg()
    target = wrapped_uint8_target()
    x = torch.randn(4, 3, 16, 20)
    with healthmon.watch(gen, prefix="gen", on_anomaly="log") as mon_g, \
            healthmon.watch(disc, prefix="disc", on_anomaly="log") as mon_d:
        F.cross_entropy(gen(x), target.long())  # generator's step: its monitor
        assert [a.site for a in mon_g.anomalies] == ["cross_entropy"] and not mon_d.anomalies
        mon_g.step()
        mon_d.step()
        # no watched forward in flight: not a watched model's loss, torch's own error
        with pytest.raises(IndexError):
            F.cross_entropy(torch.randn(4, 8, 16, 20), target.long())
