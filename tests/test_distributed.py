"""Rank-aware monitoring with real torch.distributed (gloo on CPU, spawned processes).

Three process groups run (world 2 DDP, world 2 FSDP2, world 4 DDP); each rank runs a list
of scenarios from ``_dist_worker`` and writes one result per scenario; the tests assert on
them here. Every group has a hard deadline: processes still alive are killed and the
test fails (a hang is a failure, never a stuck suite).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")

sys.path.insert(0, os.path.dirname(__file__))
import _dist_worker as W  # noqa: E402

DDP2 = ["lazy_init", "ddp_healthy", "ddp_healthy_bucket_view", "ddp_forward_nan", "ddp_input_nan",
        "ddp_backward_nan", "ddp_grad_only_nan", "warn_mode", "sync_mode", "skip_mode", "mismatch_off",
        "mismatch_every"]
FSDP2 = ["fsdp_healthy", "fsdp_forward_nan"]
DDP4 = ["ddp_forward_nan_w4", "two_bad_ranks"]


@pytest.fixture(scope="module")
def ddp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp2")
    return W.run_group(2, DDP2, str(out), timeout=90), out


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp2")
    return W.run_group(2, FSDP2, str(out), timeout=90)


@pytest.fixture(scope="module")
def ddp4(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp4")
    return W.run_group(4, DDP4, str(out), timeout=120)


def no_errors(results):
    for rank, r in enumerate(results):
        assert "Traceback" not in str(r.get("error")), f"rank {rank}:\n{r['error']}"


def assert_all_stopped(results, step, bad_rank, site, phase):
    """Every rank raised the same DistributedHealthError at ``step`` naming ``bad_rank``."""
    no_errors(results)
    for rank, r in enumerate(results):
        e = r["error"]
        assert e is not None, f"rank {rank} finished {r['steps']} steps without an error"
        assert e["type"] == "DistributedHealthError"
        assert (e["step"], e["rank"], e["site"], e["phase"]) == (step, bad_rank, site, phase)
        assert r["steps"] == step  # stopped in that step, not later
        head = e["message"].splitlines()[0]
        assert head.startswith(f"healthmon: rank {bad_rank} saw NaN in {phase} of {site} (")
        assert f"at step {step}" in head
        if rank == bad_rank:
            assert head.endswith("(this rank)")
        else:
            # healthy, or (DDP averages the bad gradient into every rank's update) its
            # weights went bad after the all-reduce: named a later-phase consequence
            assert head.endswith(f"; this rank ({rank}) was healthy") or head.endswith(
                "in a later phase (likely a consequence)"), head


# --------------------------------------------------------------------------- DDP, world 2

@pytest.mark.parametrize("scenario", ["ddp_healthy", "ddp_healthy_bucket_view"])
def test_ddp_healthy_records_local_gradients(ddp2, scenario):
    results = ddp2[0][scenario]
    no_errors(results)
    for rank, r in enumerate(results):
        assert r["anomalies"] == 0
        assert r["rank_info"] == [rank, 2, "cpu"]
        # names of the inner module: no "module." prefix of the DDP wrapper
        # "<loss>": the tensor backward ran on (the loss is a site since issue 16)
        assert r["sites"] == ["<input>", "<loss>", "gradpoison", "head", "layers.0",
                              "layers.1", "layers.2", "layers.3", "poison", "scale"]
        assert r["roles"] == ["bias [before all-reduce]", "weight [before all-reduce]"]
        # grad records are this rank's local gradient, before DDP's all-reduce
        assert r["n_checked"] == 6 * 7 and r["local_match"]
        assert r["reduced_differs"] > 6 * 5
        assert r["collectives"] == 6  # one flag all-reduce per checked step


def test_process_group_initialised_after_watch(ddp2):
    results = ddp2[0]["lazy_init"]
    assert_all_stopped(results, 2, 1, "poison", "forward")
    for r in results:
        assert not r["before"] and r["after"]
        assert r["roles"] == ["bias [before all-reduce]", "weight [before all-reduce]"]


def test_ddp_forward_nan_stops_every_rank(ddp2):
    assert_all_stopped(ddp2[0]["ddp_forward_nan"], 3, 1, "poison", "forward")


def test_ddp_input_nan_on_rank0(ddp2):
    assert_all_stopped(ddp2[0]["ddp_input_nan"], 2, 0, "<input>", "input")


def test_ddp_backward_nan(ddp2):
    results = ddp2[0]["ddp_backward_nan"]
    assert_all_stopped(results, 2, 1, "gradpoison", "backward")
    assert results[0]["error"]["role"].startswith("grad_input")


def test_ddp_grad_only_nan_is_blamed_on_its_rank(ddp2):
    # after the all-reduce every rank's gradient is NaN: a post-reduce record would blame
    # rank 0; the local record names rank 1 (gradient_as_bucket_view=True as well)
    results = ddp2[0]["ddp_grad_only_nan"]
    assert_all_stopped(results, 3, 1, "scale", "grad")
    assert results[0]["error"]["role"] == "weight [before all-reduce]"
    # rank 0's weights go bad too once the NaN gradient is averaged in (phase param)
    assert results[0]["error"]["first_ranks"] == [1]
    assert results[0]["error"]["by_rank"] == [0, 1]


def test_warn_mode_all_ranks_take_the_same_branch(ddp2):
    results = ddp2[0]["warn_mode"]
    no_errors(results)
    for rank, r in enumerate(results):
        assert r["stopped_at"] == 3 and r["steps"] == 3
        assert len(r["warnings"]) == 1 and r["warnings"][0].startswith(
            "healthmon: rank 1 saw NaN in forward of poison (output) at step 3")
        # rank 0 keeps its own anomaly: its weights went bad once the NaN gradient was
        # averaged into its update (phase param); healthy ranks would store rank 1's
        assert r["anomaly_ranks"] == ([1] if rank == 1 else [0])


def test_sync_mode_raises_at_the_boundary_on_every_rank(ddp2):
    assert_all_stopped(ddp2[0]["sync_mode"], 2, 1, "poison", "forward")


def test_skip_mode_every_rank_skips_the_same_update(ddp2):
    results = ddp2[0]["skip_mode"]
    no_errors(results)
    for rank, r in enumerate(results):
        assert r["error"] is None and r["steps"] == 6, r  # training went on
        assert len(r["skipped"]) == 1, r   # the poisoned step, on both ranks alike
        assert r["finite"] and r["same"], r
    assert results[0]["skipped"] == results[1]["skipped"]


def test_config_mismatch_raises_on_every_rank(ddp2):
    for name, text in (("mismatch_off", "rank 1: HEALTHMON=off"),
                       ("mismatch_every", "rank 1: HEALTHMON=on, every=2")):
        results = ddp2[0][name]
        no_errors(results)
        for r in results:
            assert r["raised"], name
            assert "settings differ between ranks" in r["message"] and text in r["message"]
            assert "rank 0: HEALTHMON=on, every=1, on_anomaly=raise" in r["message"]


def test_rank_files_and_merged_report(ddp2, tmp_path):
    pytest.importorskip("matplotlib")
    from healthmon.__main__ import main
    from healthmon.sinks import read_jsonl
    out = ddp2[1]
    for base in ("fwd2", "healthy0"):
        assert sorted(f for f in os.listdir(out) if f.startswith(base + ".")) == \
            [f"{base}.rank0.jsonl", f"{base}.rank1.jsonl"]
    records, anomalies, metas = read_jsonl(str(out / "fwd2.jsonl"))  # the base name
    assert [(m["rank"], m["world_size"], m["local_rank"]) for m in metas] == \
        [(0, 2, 0), (1, 2, 1)]
    assert all(m["host"] for m in metas)
    assert {r["rank"] for r in records} == {0, 1}
    # each rank logs only what it saw itself: rank 1 the NaN, rank 0 its weights made NaN
    # by the averaged gradient (phase param); no copies of rank 1's anomaly
    assert [(a["rank"], a["step"], a["site"], a["phase"]) for a in anomalies] == \
        [(1, 3, "poison", "forward"), (0, 3, "layers.0", "param")]
    assert read_jsonl(str(out / "fwd2.rank*.jsonl"))[1] == anomalies  # a glob
    html = tmp_path / "report"
    assert main(["report", str(out / "fwd2.jsonl"), "-o", str(html)]) == 0
    page = (html / "index.html").read_text()
    assert "fwd2.rank0.jsonl" in page and "fwd2.rank1.jsonl" in page
    assert "step 3, rank 1" in page and "2 anomalies" in page


# --------------------------------------------------------------------------- FSDP2

def test_fsdp2_healthy_records_local_shards(fsdp2):
    results = fsdp2["fsdp_healthy"]
    no_errors(results)
    for r in results:
        assert r["error"] is None and r["anomalies"] == 0
        # original names: no _checkpoint_wrapped_module / _fsdp_wrapped_module
        # "<loss>": the tensor backward ran on (the loss is a site since issue 16)
        assert r["sites"] == ["<input>", "<loss>", "gradpoison", "head", "layers.0",
                              "layers.1", "layers.2", "layers.3", "poison", "scale"]
        assert r["n_checked"] == 5 * 7 and r["shard_match"]


def test_fsdp2_forward_nan_stops_every_rank(fsdp2):
    results = fsdp2["fsdp_forward_nan"]
    no_errors(results)
    for rank, r in enumerate(results):
        e = r["error"]
        assert e is not None and r["steps"] == 3
        assert (e["type"], e["step"], e["rank"], e["site"], e["phase"]) == \
            ("DistributedHealthError", 3, 1, "poison", "forward")
        # the reduce-scattered shards carry rank 1's NaN to rank 0 (phase grad, after
        # reduce-scatter): rank 0 is bad too, but in a later phase, so rank 1 is first
        assert e["first_ranks"] == [1] and e["by_rank"] == [0, 1]
        head = e["message"].splitlines()[0]
        if rank == 1:
            assert head.endswith("(this rank)")
        else:
            assert "this rank (0) saw NaN in grad of" in head
            assert "[shard, after reduce-scatter]) at step 3, in a later phase" in head


# --------------------------------------------------------------------------- DDP, world 4

def test_ddp_world4_nan_on_rank2(ddp4):
    assert_all_stopped(ddp4["ddp_forward_nan_w4"], 3, 2, "poison", "forward")


def test_two_bad_ranks_earliest_phase_first(ddp4):
    results = ddp4["two_bad_ranks"]
    no_errors(results)
    for rank, r in enumerate(results):
        e = r["error"]
        assert (e["step"], e["rank"], e["site"], e["phase"]) == (2, 3, "poison", "forward")
        # ranks 0 and 2 only see the averaged NaN in their updated weights (phase param)
        assert e["first_ranks"] == [3] and e["by_rank"] == [0, 1, 2, 3]
        head = e["message"].splitlines()[0]
        if rank == 1:
            assert "this rank (1) saw NaN in grad of scale (weight [before all-reduce])" \
                in head and "later phase" in head
        elif rank != 3:
            assert head.endswith(f"this rank ({rank}) saw NaN in param of layers.0 (weight) "
                                 "at step 2, in a later phase (likely a consequence)")
            assert "also bad at this step: " in e["message"]
            assert "rank 1 (NaN in grad of scale)" in e["message"]


# --------------------------------------------------------------------------- no process group

def test_original_names_drop_wrapper_components():
    from torch import nn

    from healthmon.distributed import named_modules

    class Holder(nn.Module):  # a user's own child called "module" is kept
        def __init__(self):
            super().__init__()
            self.module = nn.Linear(2, 2)

    inner = nn.Sequential(nn.Linear(2, 2), Holder())
    for wrapped in (nn.DataParallel(inner), torch.compile(inner)):
        assert [q for q, _ in named_modules(wrapped)] == ["", "", "0", "1", "1.module"]


def test_expand_logs_finds_rank_files_in_rank_order(tmp_path):
    from healthmon.sinks import JsonlSink, expand_logs, rank_path
    base = str(tmp_path / "run.jsonl")
    for rank in (10, 2, 0):
        JsonlSink(rank_path(base, rank), rank=rank).close()
    JsonlSink(str(tmp_path / "run2.rank1.jsonl"), rank=1).close()  # another run: not taken
    want = [rank_path(base, r) for r in (0, 2, 10)]
    assert expand_logs(base) == want
    assert expand_logs(str(tmp_path / "run.rank*.jsonl")) == want
    assert expand_logs([rank_path(base, 2)]) == [rank_path(base, 2)]
    with pytest.raises(FileNotFoundError, match="nor rank files"):
        expand_logs(str(tmp_path / "other.jsonl"))
