"""Trainer integrations with the real libraries: Lightning and the Hugging Face Trainer.

Tiny models on CPU (a 4-8-1 MLP LightningModule, a 2-layer GPT-2 from a config: nothing is
downloaded). A NaN is injected by a module that returns NaN in its own forward output at a
chosen global step, so the expected site and step are known exactly.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

L = pytest.importorskip("lightning")
transformers = pytest.importorskip("transformers")

import healthmon  # noqa: E402
from healthmon.integrations import hf as hm_hf  # noqa: E402
from healthmon.integrations import lightning as hm_l  # noqa: E402
from healthmon.integrations.autopatch import TrainerPatch  # noqa: E402
from healthmon.integrations.metrics import health_metrics  # noqa: E402
from healthmon.sinks import MemorySink  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _integ_models import TinyModule, loader  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("HEALTHMON"):
            monkeypatch.delenv(var)
    warnings.filterwarnings("ignore", module="lightning")


def hooks_left(model: torch.nn.Module) -> int:
    """Hooks of any kind on the model's modules and parameters."""
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
    for p in model.parameters():
        n += len(p._post_accumulate_grad_hooks or {}) + len(p._backward_hooks or {})
    return n


StepSink = MemorySink  # (site rows of every decoded step)


def trainer(**kw):
    base = dict(accelerator="cpu", logger=False, enable_progress_bar=False,
                enable_checkpointing=False, enable_model_summary=False)
    base.update(kw)
    return L.Trainer(**base)


# --------------------------------------------------------------------------- Lightning

class StepProbe(L.Callback):
    """After the healthmon callback: the monitor's step number at every training batch."""

    def __init__(self, hm):
        self.hm = hm
        self.pairs = []  # (trainer.global_step, monitor step) at batch start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.pairs.append((trainer.global_step, self.hm.monitor.step_index))


def test_lightning_healthy_steps_accumulation_validation_and_cleanup():
    sink = StepSink()
    cb = hm_l.HealthmonCallback(sinks=[sink])
    probe = StepProbe(cb)
    model = TinyModule()
    t = trainer(max_steps=4, accumulate_grad_batches=2, val_check_interval=2,
                limit_val_batches=2, num_sanity_val_steps=2, callbacks=[cb, probe])
    t.fit(model, loader(8), loader(2, seed=1))
    assert t.global_step == 4
    # micro-batches share a step; validation batches (every 2 batches) start none
    assert model.batch_steps == [0, 0, 1, 1, 2, 2, 3, 3]
    assert probe.pairs == [(g, g) for g in model.batch_steps]
    training = [s for s, rows in sink.steps if any(r["phase"] == "grad" for r in rows)]
    assert training == [0, 1, 2, 3]
    # the last training step was decoded (at the end of its batch); validation after it
    # carries global step 4 (as Lightning logs it) and has no gradients
    assert [s for s, _ in sink.steps if s not in training] in ([], [4])
    assert all(r["nan"] == 0 and r["posinf"] == 0 for _, rows in sink.steps for r in rows)
    assert cb.monitor is None and hooks_left(model) == 0


def test_lightning_nan_reported_at_trainer_step_with_site():
    model = TinyModule(bad_step=3)
    cb = hm_l.HealthmonCallback()
    t = trainer(max_steps=6, accumulate_grad_batches=2, val_check_interval=2,
                limit_val_batches=1, num_sanity_val_steps=1, callbacks=[cb])
    with pytest.raises(healthmon.HealthError) as info:
        t.fit(model, loader(12), loader(1, seed=1))
    a = info.value.anomaly
    assert (a.step, a.site, a.phase) == (3, "net.1", "forward")
    assert "NaN in net.1 [Inject]" in str(info.value) and "step 3" in str(info.value)
    assert t.global_step == 3  # raised before step 3's update: the weights never saw it
    assert cb.monitor is None and hooks_left(model) == 0  # removed by on_exception


def test_lightning_nan_in_last_step_is_checked_at_train_end():
    model = TinyModule(bad_step=2)
    cb = hm_l.HealthmonCallback(sync=False)
    t = trainer(max_steps=3, callbacks=[cb], num_sanity_val_steps=0)
    with pytest.raises(healthmon.HealthError) as info:
        t.fit(model, loader(3))
    assert (info.value.anomaly.step, info.value.anomaly.site) == (2, "net.1")
    assert hooks_left(model) == 0


class MetricsLogger(L.pytorch.loggers.Logger):
    """A Lightning logger that keeps every ``log_metrics`` call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def name(self):
        return "capture"

    @property
    def version(self):
        return 0

    def log_metrics(self, metrics, step=None):
        self.calls.append((step, dict(metrics)))

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_lightning_health_metrics_reach_the_logger_at_its_cadence():
    logger = MetricsLogger()
    model = TinyModule()
    t = trainer(max_steps=6, logger=logger, log_every_n_steps=3, num_sanity_val_steps=0,
                callbacks=[hm_l.HealthmonCallback(max_modules=1)])
    t.fit(model, loader(6))
    ours = [(s, m) for s, m in logger.calls if any(k.startswith("healthmon/") for k in m)]
    assert [s for s, _ in ours] == [2, 5]  # Lightning's cadence: steps 2 and 5 of 0..5
    for _, m in ours:
        assert len(m) == 2 * 1 + 6  # max_modules=1: one module's keys plus the totals
        assert m["healthmon/nan"] == 0 and m["healthmon/anomalies"] == 0
        per_module = [k for k in m if k.startswith("healthmon/grad_norm/")]
        assert per_module == ["healthmon/grad_norm/net.3"]  # first in backward order
        assert 0 < m["healthmon/grad_norm/net.3"] <= m["healthmon/grad_norm"]
        assert math.isfinite(m["healthmon/grad_norm"])


def test_lightning_env_warn_mode_keeps_training_and_counts_warnings(monkeypatch):
    monkeypatch.setenv("HEALTHMON_ON_ANOMALY", "warn")
    logger = MetricsLogger()
    model = TinyModule(bad_step=1)
    t = trainer(max_steps=3, logger=logger, log_every_n_steps=1, num_sanity_val_steps=0,
                callbacks=[hm_l.HealthmonCallback()])
    with pytest.warns(RuntimeWarning, match=r"NaN in net\.1 \[Inject\] \(forward output\), "
                                            r"step 1"):
        t.fit(model, loader(3))
    assert t.global_step == 3
    logged = {s: m for s, m in logger.calls if "healthmon/nan" in m}
    assert logged[0]["healthmon/anomalies"] == 0 and logged[0]["healthmon/nan"] == 0
    assert logged[1]["healthmon/anomalies"] >= 1 and logged[1]["healthmon/nan"] > 0


def test_lightning_healthmon_off_installs_nothing(monkeypatch):
    monkeypatch.setenv("HEALTHMON", "off")
    model = TinyModule(bad_step=1)
    seen = []

    class Look(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            seen.append(hooks_left(pl_module))

    t = trainer(max_steps=2, num_sanity_val_steps=0,
                callbacks=[hm_l.HealthmonCallback(), Look()])
    t.fit(model, loader(2))  # the NaN goes unreported: monitoring is off
    assert seen == [0, 0]


def test_callback_rejects_unknown_and_invalid_options(monkeypatch):
    with pytest.raises(TypeError, match="unknown option.*evry"):
        hm_l.HealthmonCallback(evry=2)
    monkeypatch.setenv("HEALTHMON_EVERY", "zero")
    with pytest.raises(ValueError, match="HEALTHMON_EVERY"):
        hm_hf.HealthmonCallback()


def test_pytorch_lightning_package_gets_its_own_callback_class():
    pl = pytest.importorskip("pytorch_lightning")
    cls = hm_l.callback_class(pl)
    assert issubclass(cls, pl.Callback) and cls is hm_l.callback_class(pl)
    assert not issubclass(hm_l.HealthmonCallback, pl.Callback)  # lightning.pytorch's


def test_health_metrics_bounded_and_summed():
    rows = [
        {"site": "a", "phase": "grad", "norm": 3.0, "absmax": 2.0, "nan": 0, "posinf": 0,
         "neginf": 0},
        {"site": "a", "phase": "grad", "norm": 4.0, "absmax": 1.0, "nan": 0, "posinf": 0,
         "neginf": 0},
        {"site": "b", "phase": "grad", "norm": 12.0, "absmax": 5.0, "nan": 1, "posinf": 1,
         "neginf": 2},
        {"site": "b", "phase": "forward", "norm": 1.0, "absmax": 7.0, "nan": 2, "posinf": 0,
         "neginf": 0},
    ]
    m = health_metrics(rows, anomalies=2, max_modules=1)
    assert m == {"healthmon/grad_norm/a": 5.0, "healthmon/grad_absmax/a": 2.0,
                 "healthmon/grad_norm": 13.0, "healthmon/grad_absmax": 5.0,
                 "healthmon/forward_absmax": 7.0, "healthmon/nan": 3.0, "healthmon/inf": 3.0,
                 "healthmon/anomalies": 2.0}


# --------------------------------------------------------------------------- DDP

def test_lightning_ddp_every_rank_stops_at_the_same_step(tmp_path):
    """Lightning's ``ddp`` strategy, 2 CPU processes, gloo; rank 1 injects a NaN at global
    step 3. Hard deadline: the process group is killed and the test fails on a hang."""
    out = run_with_deadline([sys.executable, os.path.join(ROOT, "tests", "_integ_models.py"),
                             str(tmp_path)], tmp_path, timeout=240)
    results = rank_results(tmp_path, out)
    for rank, r in enumerate(results):
        assert r["type"] == "DistributedHealthError", (rank, r)
        assert (r["step"], r["site"]) == (3, "net.1")
        assert r["batch_steps"] == [0, 1, 2, 3] and r["global_step"] == 4
        assert r["message"].startswith("healthmon: rank 1 saw NaN in forward of net.1 "
                                       "(output) at step 3")
        assert r["hooks_left"] == 0


def run_with_deadline(cmd, tmp_path, timeout):
    """Run ``cmd`` in its own process group; kill the group and fail on a hang."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHMON")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{cmd[-2:]} still running after {timeout} s (a hang): killed")
    return out


def rank_results(tmp_path, out, world=2):
    results = []
    for rank in range(world):
        path = tmp_path / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result; output:\n{out[-3000:]}"
        results.append(json.loads(path.read_text()))
    return results


def test_hf_accelerate_ddp_every_rank_stops_at_the_same_step(tmp_path):
    """HF Trainer under torch.distributed.run (accelerate DDP, 2 CPU processes, gloo); rank 1
    injects a NaN at global step 2."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = run_with_deadline([sys.executable, "-m", "torch.distributed.run",
                             "--nproc_per_node", "2", "--master_port", str(port),
                             os.path.join(ROOT, "tests", "_integ_hf_ddp.py"), str(tmp_path)],
                            tmp_path, timeout=240)
    for rank, r in enumerate(rank_results(tmp_path, out)):
        assert r["world"] == 2
        assert r["type"] == "DistributedHealthError", (rank, r)
        assert (r["step"], r["site"]) == (2, "transformer.h.1.mlp")
        assert r["message"].startswith("healthmon: rank 1 saw NaN in forward of "
                                       "transformer.h.1.mlp (output) at step 2")
        assert r["global_step"] == 3 and r["hooks_left"] == 0


# --------------------------------------------------------------------------- Hugging Face

class TokenData(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        ids = torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": ids, "labels": ids}


class LogCapture(transformers.TrainerCallback):
    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append((state.global_step, dict(logs)))


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64,
                                  n_positions=8)
    return transformers.GPT2LMHeadModel(cfg)


def hf_trainer(model, tmp_path, callbacks, **kw):
    args = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2,
                per_device_eval_batch_size=4, report_to=[], use_cpu=True,
                save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    args.update(kw)
    return transformers.Trainer(model=model, args=transformers.TrainingArguments(**args),
                                train_dataset=TokenData(32), eval_dataset=TokenData(4),
                                callbacks=callbacks)


def test_hf_healthy_steps_metrics_and_cleanup(tmp_path):
    model = gpt2()
    sink = StepSink()
    cb = hm_hf.HealthmonCallback(sinks=[sink], max_modules=4)
    cap = LogCapture()
    tr = hf_trainer(model, tmp_path, [cb, cap], max_steps=4, gradient_accumulation_steps=2,
                    logging_steps=2, eval_strategy="steps", eval_steps=2)
    tr.train()
    training = [s for s, rows in sink.steps if any(r["phase"] == "grad" for r in rows)]
    assert training == [0, 1, 2, 3]  # 2 micro-batches per step, evaluation starts none
    train_logs = [(g, l) for g, l in cap.logs if "loss" in l]
    assert [g for g, _ in train_logs] == [2, 4]
    for _, logs in train_logs:
        assert len([k for k in logs if k.startswith("healthmon/grad_norm/")]) == 4
        assert logs["healthmon/nan"] == 0 and math.isfinite(logs["healthmon/grad_norm"])
        assert logs["healthmon/grad_norm"] > 0
    # kept in the trainer's history too (trainer_state.json)
    assert any("healthmon/grad_norm" in h for h in tr.state.log_history)
    assert cb.monitor is None and hooks_left(model) == 0


def test_hf_nan_reported_at_global_step_with_site(tmp_path):
    model = gpt2()
    holder = {}

    def poison(module, args, output):  # GPT-2 block 1's MLP returns NaN at global step 2
        if module.training and holder["trainer"].state.global_step == 2:
            return output * float("nan")  # a new tensor: the MLP's own output is bad
        return None

    handle = model.transformer.h[1].mlp.register_forward_hook(poison)
    cb = hm_hf.HealthmonCallback()
    tr = hf_trainer(model, tmp_path, [cb], max_steps=5, gradient_accumulation_steps=2,
                    logging_steps=1, eval_strategy="steps", eval_steps=1)
    holder["trainer"] = tr
    with pytest.raises(healthmon.HealthError) as info:
        tr.train()
    a = info.value.anomaly
    assert (a.step, a.site, a.phase) == (2, "transformer.h.1.mlp", "forward")
    assert "step 2" in str(info.value).splitlines()[0]
    assert tr.state.global_step == 2  # raised before the bad step's update (weights kept)
    handle.remove()
    assert cb.monitor is None and hooks_left(model) == 0


def test_hf_add_to_puts_the_callback_before_report_to(tmp_path):
    tr = hf_trainer(gpt2(), tmp_path, None, max_steps=2, logging_steps=1)
    reporter = LogCapture()  # stands where the report_to integrations sit: before callbacks=
    tr.callback_handler.callbacks.insert(0, reporter)
    cb = hm_hf.add_to(tr)
    assert tr.callback_handler.callbacks[0] is cb
    tr.train()
    train_logs = [l for _, l in reporter.logs if "loss" in l]
    assert len(train_logs) == 2 and all("healthmon/grad_norm" in l for l in train_logs)


# --------------------------------------------------------------------------- healthmon run

LIGHTNING_SCRIPT = """\
import warnings
import torch
import lightning as L
from torch import nn

warnings.filterwarnings("ignore")


class Net(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    def training_step(self, batch, i):
        x, y = batch
        h = self.body[0](x)
        if self.trainer.global_step == 3:
            h = h.log()  # NaN where h < 0: reported in body.1 (its output is the first bad)
        return ((self.body[2](self.body[1](h)) - y) ** 2).mean()

    def validation_step(self, batch, i):
        return self.body(batch[0]).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


data = torch.utils.data.TensorDataset(torch.randn(48, 4), torch.randn(48, 1))
dl = torch.utils.data.DataLoader(data, batch_size=4)
trainer = L.Trainer(accelerator="cpu", max_steps=6, accumulate_grad_batches=2,
                    val_check_interval=2, limit_val_batches=2, logger=False,
                    enable_progress_bar=False, enable_checkpointing=False,
                    enable_model_summary=False)
trainer.fit(Net(), dl, dl)
print("finished")
"""


def test_healthmon_run_uses_the_lightning_trainers_steps(tmp_path):
    script = tmp_path / "train_lightning.py"
    script.write_text(textwrap.dedent(LIGHTNING_SCRIPT))
    env = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHMON")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "healthmon", "run", str(script)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=240)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "finished" not in proc.stdout
    # root forwards would number this step 6 (2 micro-batches per step), validation more.
    # "call N": the validation batches run before it in step 3 are calls of body.1 too
    assert re.search(r"healthmon: NaN in body\.1 \[Tanh\]( call \d+)? \(forward output\), "
                     r"step 3:", proc.stderr), proc.stderr[-3000:]
    assert "train_lightning.py" in proc.stderr  # the stack: where body.1 was called


def test_trainer_patch_wraps_and_restores_lightning():
    cls = L.Trainer
    fit, validate = cls.__dict__["fit"], cls.__dict__["validate"]
    calls = []
    patch = TrainerPatch({}, lambda: calls.append("suspend"), lambda: calls.append("resume"))
    patch.start()
    try:
        assert cls.__dict__["fit"] is not fit and cls.__dict__["fit"].__wrapped__ is fit
        assert cls.__dict__["validate"].__wrapped__ is validate
    finally:
        patch.stop()
    assert cls.__dict__["fit"] is fit and cls.__dict__["validate"] is validate
    patch.stop()  # idempotent


def test_import_healthmon_imports_no_trainer_library():
    code = ("import sys, healthmon, healthmon.runner\n"
            "a = healthmon.watch_all().start(); a.stop()\n"
            "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') "
            "if m in sys.modules]\n"
            "assert not bad, bad\n")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_trainer_patch_adds_the_hf_callback_first_and_takes_it_out(tmp_path):
    model = gpt2()
    holder = {}

    def poison(module, args, output):
        if module.training and holder["trainer"].state.global_step == 1:
            return output * float("nan")
        return None

    model.transformer.h[0].mlp.register_forward_hook(poison)
    tr = hf_trainer(model, tmp_path, None, max_steps=3)
    holder["trainer"] = tr
    before = list(tr.callback_handler.callbacks)
    train = transformers.Trainer.__dict__["train"]
    state = []
    patch = TrainerPatch({}, lambda: state.append("suspend"), lambda: state.append("resume"))
    patch.start()
    try:
        with pytest.raises(healthmon.HealthError) as info:
            tr.train()
    finally:
        patch.stop()
    assert (info.value.anomaly.step, info.value.anomaly.site) == (1, "transformer.h.0.mlp")
    assert state == ["suspend", "resume"]
    assert tr.callback_handler.callbacks == before  # taken out again
    assert transformers.Trainer.__dict__["train"] is train
    assert hooks_left(model) == 1  # only the test's own poison hook
