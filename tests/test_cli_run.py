"""`python -m healthmon run SCRIPT.py`: unmodified scripts monitored through global hooks."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import healthmon

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAN_SCRIPT = """\
import sys
import torch
from torch import nn


class Normalise(nn.Module):
    def forward(self, x, div):
        return x / div


model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
norm = Normalise()
opt = torch.optim.SGD(model.parameters(), lr=0.1)
print("args:", sys.argv[1:])
for step in range(5):
    div = torch.ones(4)
    if step == 3 and "--healthy" not in sys.argv:
        div[1] = 0.0
    h = model(torch.randn(2, 4))
    y = norm(h * 0, div)  # 0 / 0 at step 3
    loss = y.sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
print("finished")
"""


def run_cli(tmp_path, script_text, *args, env=None, name="train.py", options=()):
    script = tmp_path / name
    script.write_text(textwrap.dedent(script_text))
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHMON")}
    environ["PYTHONPATH"] = ROOT + os.pathsep + environ.get("PYTHONPATH", "")
    environ.update(env or {})
    return subprocess.run([sys.executable, "-m", "healthmon", "run", *options, str(script),
                           *args],
                          capture_output=True, text=True, env=environ, cwd=tmp_path,
                          timeout=120)


def test_seeded_nan_is_caught_with_site_step_and_line(tmp_path):
    proc = run_cli(tmp_path, NAN_SCRIPT, "--foo", "1")
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert "NaN in Normalise (forward output), step 3" in err
    assert 'train.py", line 20' in err and "y = norm(h * 0, div)" in err
    assert "Traceback" not in err  # the report, not a traceback through runpy
    assert "args: ['--foo', '1']" in proc.stdout and "finished" not in proc.stdout


def test_healthy_script_runs_to_completion_with_its_args(tmp_path):
    proc = run_cli(tmp_path, NAN_SCRIPT, "--healthy")
    assert proc.returncode == 0, proc.stderr
    assert "args: ['--healthy']" in proc.stdout and "finished" in proc.stdout
    assert "monitoring every nn.Module (async)" in proc.stderr


def test_healthmon_off_installs_nothing(tmp_path):
    script = NAN_SCRIPT + textwrap.dedent("""\
        from torch.nn.modules import module as m
        print("global hooks:", len(m._global_forward_hooks), len(m._global_forward_pre_hooks),
              "module hooks:", len(model[0]._forward_hooks))
        """)
    proc = run_cli(tmp_path, script, env={"HEALTHMON": "off"})
    assert proc.returncode == 0, proc.stderr
    assert "finished" in proc.stdout
    assert "global hooks: 0 0 module hooks: 0" in proc.stdout
    assert "HEALTHMON=off" in proc.stderr


def test_script_errors_and_exit_codes_are_kept(tmp_path):
    proc = run_cli(tmp_path, """\
        import torch
        def broken():
            raise ValueError("boom from the script")
        torch.nn.Linear(2, 2)(torch.randn(1, 2))
        broken()
        """)
    assert proc.returncode == 1
    assert "ValueError: boom from the script" in proc.stderr
    assert 'train.py", line 3, in broken' in proc.stderr
    proc = run_cli(tmp_path, "import sys\nprint(sys.argv[1:])\nsys.exit(3)\n", "-q",
                   options=["--quiet"])
    assert proc.returncode == 3 and proc.stderr == ""
    assert proc.stdout.strip() == "['-q']"  # options after the script are the script's


def test_missing_script_and_bad_environment_are_clear_errors(tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("HEALTHMON")}
    environ["PYTHONPATH"] = ROOT
    proc = subprocess.run([sys.executable, "-m", "healthmon", "run", "nope.py"],
                          capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "no such script" in proc.stderr
    proc = run_cli(tmp_path, "print('x')\n", env={"HEALTHMON": "maybe"})
    assert proc.returncode == 2 and "HEALTHMON='maybe'" in proc.stderr


def test_watch_all_in_process(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    loss_fn = nn.MSELoss()
    before = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))
    with pytest.raises(healthmon.HealthError) as info:
        with healthmon.watch_all() as auto:
            for step in range(3):
                x = torch.randn(2, 3)
                if step == 2:
                    x[0, 0] = float("nan")
                loss_fn(model(x), torch.zeros(2, 3)).backward()
    a = info.value.anomaly
    assert (a.site, a.phase, a.step) == ("<input>", "input", 2)
    assert len(auto.monitors) == 1
    names = {r["site"] for r in auto.monitor.records()}
    assert "MSELoss" in names and "0" in names  # the loss module joined the same monitor
    after = (len(torch_module._global_forward_hooks), len(torch_module._global_forward_pre_hooks))
    assert after == before and not model[0]._forward_hooks


def test_watch_all_memory_bounded_and_explicit_watch_wins(monkeypatch):
    for var in ("HEALTHMON", "HEALTHMON_EVERY", "HEALTHMON_ON_ANOMALY", "HEALTHMON_LOG"):
        monkeypatch.delenv(var, raising=False)
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh())
    with healthmon.watch_all() as auto:
        sizes = []
        for _ in range(20):
            nn.MSELoss()(model(torch.randn(2, 3)), torch.zeros(2, 3)).backward()  # new each step
            sizes.append((len(auto.monitor._modules), auto.monitor.num_sites))
        assert sizes[-1] == sizes[2]  # a module built anew at every step never joins
        # the script watches the model itself: its own monitor takes over
        mine = healthmon.watch(model, sync=True)
        assert not auto.monitors[0].active and mine.active
        x = torch.randn(2, 3)
        x[0, 1] = float("inf")
        with pytest.raises(healthmon.HealthError, match="<input>"):
            model(x)  # sync: raised by the script's monitor, at the call
        mine.remove()
