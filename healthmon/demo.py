"""`python -m healthmon demo`: the main job on an embedded default.

A small UNet-like segmentation model trained on synthetic images, monitored by healthmon;
then the same training with two real-world bugs injected, each caught with its report:

1. the uint8 label wrap-around (``label -= 1`` on a uint8 map turns "void" 0 into 255, and
   ``cross_entropy`` would die with a device-side assert on a GPU);
2. a masked division (``y = x / div; loss = y[mask].sum()`` with zeros in ``div`` under the
   mask): the loss is finite but the gradient is NaN;
3. a learning-rate schedule that grows instead of decaying (``ExponentialLR(gamma=1.08)``):
   early warnings (:class:`~healthmon.HealthWarning`) come steps before the first Inf.
"""
from __future__ import annotations

import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

NUM_CLASSES = 4
IMAGE_SIZE = 32


class TinyUNet(nn.Module):
    """Two-level UNet: ``(B, 3, H, W)`` float32 images -> ``(B, num_classes, H, W)`` logits."""

    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 8):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, padding=1),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.up = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec = nn.Sequential(nn.Conv2d(2 * width, width, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.enc1(x)
        deep = self.enc2(F.max_pool2d(skip, 2))
        return self.head(self.dec(torch.cat([self.up(deep), skip], dim=1)))


VOID_BATCH_RATE = 0.05   # share of batches with an unlabelled (void) border row
RARE_ABSENT_RATE = 0.05  # share of batches in which the rare class does not appear


def synthetic_batch(gen: torch.Generator, batch: int = 8, size: int = IMAGE_SIZE):
    """Images of coloured rectangles on a dark background and their 1-based label maps.

    Returns:
        images: float32 ``(B, 3, size, size)``, normalised.
        labels: uint8 ``(B, size, size)``; 0 = void, 1.. = background and shapes, as many
        datasets store them (hence the ``label -= 1`` of the demo's bug). A few batches
        have a void border row (as annotation tools leave them) and a few lack the rare
        class: the two conditions the demo's bugs need, so they strike at a later step.
    """
    palette = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.2, 0.2, 0.9]])
    labels = torch.ones(batch, size, size, dtype=torch.uint8)  # class 0 (background), 1-based
    void, rare_absent = (bool(v) for v in torch.rand(2, generator=gen) <
                         torch.tensor([VOID_BATCH_RATE, RARE_ABSENT_RATE]))
    top = NUM_CLASSES - 1 if rare_absent else NUM_CLASSES
    for b in range(batch):
        for i in range(3):
            cls = NUM_CLASSES - 1 if (i == 0 and b == 0 and not rare_absent) else \
                int(torch.randint(1, top, (1,), generator=gen))
            y0, x0 = (int(v) for v in torch.randint(0, size - 8, (2,), generator=gen))
            h, w = (int(v) for v in torch.randint(4, 12, (2,), generator=gen))
            labels[b, y0:y0 + h, x0:x0 + w] = cls + 1
    if void:
        labels[:, 0, :] = 0
    images = palette[(labels.long() - 1).clamp(min=0)].permute(0, 3, 1, 2)
    images = images + 0.1 * torch.randn(images.shape, generator=gen)
    return (images - 0.5) / 0.3, labels


def healthy_loss(logits, labels_u8):
    """The right way: widen first, then shift; void (-1) is ignored."""
    target = labels_u8.long() - 1
    return F.cross_entropy(logits, target, ignore_index=-1)


def wraparound_loss(logits, labels_u8):
    """The bug: shifting the uint8 map in place turns void 0 into 255."""
    labels_u8 = labels_u8.clone()
    labels_u8 -= 1
    return F.cross_entropy(logits, labels_u8.long(), ignore_index=-1)


def masked_division_loss(logits, labels_u8):
    """The bug: a per-class normalisation divides by class pixel counts, some of which are 0;
    the masked selection keeps the loss finite while the gradient goes NaN."""
    target = labels_u8.long() - 1
    base = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
    probs = logits.softmax(dim=1)
    counts = F.one_hot(target.clamp(min=0), NUM_CLASSES).sum(dim=(0, 1, 2)).float()
    share = probs.sum(dim=(0, 2, 3)) / counts  # x / 0 when a class is absent from the batch
    present = counts > 0
    return base.mean() + 0.01 * share[present].sum()   # finite loss, NaN gradient


@dataclass
class RunResult:
    """What one demo training run did."""
    steps: int
    final_loss: float
    seconds: float
    error: Optional[BaseException] = None
    summary: str = ""
    warnings: List = field(default_factory=list)  # the monitor's early warnings


def train(loss_fn: Callable, steps: int, seed: int = 0, monitor_kwargs: Optional[dict] = None,
          progress: bool = True, label: str = "", lr_growth: Optional[float] = None
          ) -> RunResult:
    """Train :class:`TinyUNet` for ``steps`` steps under ``healthmon.watch``; returns the
    result, with the :class:`~healthmon.HealthError` if one was raised and the early
    warnings. ``lr_growth``: an ``ExponentialLR`` factor per step (the schedule bug)."""
    import healthmon

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyUNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, lr_growth) if lr_growth else None
    start, loss_value, step = time.perf_counter(), float("nan"), 0
    with warnings.catch_warnings(), healthmon.watch(model, **(monitor_kwargs or {})) as mon:
        # the demo prints the warnings itself, with the step of the first non-finite value
        warnings.simplefilter("ignore", healthmon.HealthWarning)
        try:
            for step in range(1, steps + 1):
                images, labels = synthetic_batch(gen)
                loss = loss_fn(model(images), labels)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                if step % 10 == 0 or step == steps:
                    loss_value = loss.item()
                    if progress:
                        _progress(label, step, steps, loss_value)
            mon.check()
        except healthmon.HealthError as err:
            if progress:
                sys.stderr.write("\n")
            return RunResult(step, loss_value, time.perf_counter() - start, err,
                             warnings=list(mon.warnings))
        summary = mon.summary(width=100, limit=8)
    if progress:
        sys.stderr.write("\n")
    return RunResult(steps, loss_value, time.perf_counter() - start, summary=summary,
                     warnings=list(mon.warnings))


def _progress(label: str, step: int, steps: int, loss: float) -> None:
    width = 30
    done = int(width * step / steps)
    sys.stderr.write(f"\r  {label:<22} [{'#' * done}{'.' * (width - done)}] "
                     f"{step:>4}/{steps}  loss {loss:.4f}")
    sys.stderr.flush()


def main(steps: int = 300, out_dir: str = "healthmon-demo", progress: bool = True) -> int:
    """Run the demo; returns a process exit code (0 when every scenario behaved as shown)."""
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "run.jsonl")
    print(f"healthmon demo: TinyUNet segmentation, {steps} steps on synthetic images\n")

    print("1) healthy training, monitored (async mode)")
    ok = train(healthy_loss, steps, monitor_kwargs={"log": log_path}, progress=progress,
               label="healthy")
    print(f"   {ok.steps} steps in {ok.seconds:.1f} s, final loss {ok.final_loss:.4f}, "
          f"anomalies: {'none' if ok.error is None else ok.error}, early warnings: "
          f"{len(ok.warnings) or 'none'}")
    if ok.summary:
        print("   mon.summary() of the last step (worst sites first):")
        print("\n".join("     " + line for line in ok.summary.splitlines()) + "\n")

    print("2) the uint8 label wrap-around: `label -= 1` on a uint8 map, void 0 becomes 255\n"
          "   (on a GPU, cross_entropy would die with a device-side assert)")
    wrap = train(wraparound_loss, steps, progress=progress, label="label wrap-around")
    print(_indent(wrap.error) + "\n")

    print("3) a masked division: per-class shares divided by class counts, absent classes\n"
          "   masked out; the loss stays finite, the gradient is NaN")
    nan = train(masked_division_loss, steps, progress=progress, label="masked division")
    print(_indent(nan.error) + "\n")

    print("4) a learning-rate schedule that grows instead of decaying (ExponentialLR,\n"
          "   gamma=1.08): healthmon warns (HealthWarning) before the first non-finite value")
    grow = train(healthy_loss, DIVERGE_STEPS, progress=progress, label="growing lr",
                 lr_growth=1.08)
    print(_early(grow) + "\n")

    print(f"records of the healthy run: {log_path}")
    report = _render_report(log_path, out_dir)
    if report:
        print(f"plots and report: {report}")
    caught = wrap.error is not None and nan.error is not None
    warned = bool(grow.warnings) and (grow.error is None or
                                      grow.warnings[0].step < grow.error.anomaly.step)
    return 0 if ok.error is None and not ok.warnings and caught and warned else 1


DIVERGE_STEPS = 120  # the growing learning rate overflows at step 44 (seed 0)


def _early(run: RunResult) -> str:
    if not run.warnings:
        return "   (no early warning: this is a bug in healthmon)"
    first = run.warnings[0]
    lines = [f"   {w.headline()}" for w in run.warnings[:4]]
    if len(run.warnings) > 4:
        lines.append(f"   ... {len(run.warnings) - 4} more warnings (mon.warnings)")
    if run.error is not None:
        bad = run.error.anomaly
        lines.append(f"   first non-finite value ({bad.kind_text()} in {bad.where}): "
                     f"{bad.step - first.step} steps after the first warning")
    lines.append("   the first warning in full:")
    lines += ["   " + line for line in first.report().splitlines()]
    return "\n".join(lines)


def _indent(err: Optional[BaseException]) -> str:
    if err is None:
        return "   (not caught: this is a bug in healthmon)"
    return "\n".join("   " + line for line in str(err).splitlines())


def _render_report(log_path: str, out_dir: str) -> Optional[str]:
    try:
        from .report import render_report
    except ImportError:
        return None
    return render_report([log_path], out_dir)
