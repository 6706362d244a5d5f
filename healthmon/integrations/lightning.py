"""Lightning: ``Trainer(callbacks=[HealthmonCallback()])``.

```python
import lightning as L
from healthmon.integrations.lightning import HealthmonCallback

trainer = L.Trainer(callbacks=[HealthmonCallback()])  # or HealthmonCallback(sync=True, ...)
trainer.fit(model)
```

* The LightningModule is watched at ``on_train_start`` (after the sanity check, which runs
  under ``inference_mode`` and is not a step) and unwatched at ``on_train_end``, on an
  exception (``on_exception``) and at ``teardown``.
* Steps are ``trainer.global_step`` (optimizer steps): set at every training batch's start
  and end, so gradient-accumulation micro-batches are one step and validation batches
  (between the end of one training batch and the start of the next) never start one; their
  records belong to the step that follows.
* A :class:`~healthmon.HealthError` is raised from the callback hook where the step ends
  (the start of the next batch, or ``on_train_end`` for the last step), so Lightning's own
  exception path runs (``on_exception`` of every callback, loggers finalised "failed") and
  ``trainer.fit`` raises it. Under a DDP strategy every rank raises the same
  :class:`~healthmon.DistributedHealthError` at the same step.
* At the trainer's logging cadence (``log_every_n_steps``) the decoded step's health metrics
  (:func:`~healthmon.integrations.metrics.health_metrics`) go to every ``trainer.loggers``
  entry with ``log_metrics(metrics, step)`` (step: the decoded step's number).

The class subclasses ``lightning.pytorch.Callback`` when ``lightning`` is installed, else
``pytorch_lightning.Callback``; :func:`callback_class` builds it for the other package
(``callback_class(pytorch_lightning)``): a Trainer only accepts callbacks of its own package.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Dict

from .session import TrainerSession

_CLASSES: Dict[str, type] = {}


def callback_class(pl: ModuleType) -> type:
    """The ``HealthmonCallback`` class for the package ``pl`` (``lightning.pytorch`` or
    ``pytorch_lightning``; built once per package)."""
    key = pl.__name__
    cls = _CLASSES.get(key)
    if cls is None:
        cls = _CLASSES[key] = _build(pl)
    return cls


def _build(pl: ModuleType) -> type:
    class HealthmonCallback(pl.Callback):
        """Watches the LightningModule during ``fit`` with the trainer's global step as the
        step.

        Args:
            max_modules: modules given their own logged metrics (default 32).
            **watch_options: :func:`healthmon.watch` options (``every``, ``sync``,
                ``on_anomaly``, ``log``, ``allow_inf``, ``sinks``, ``prefix``); the
                ``HEALTHMON*`` environment applies as in ``watch``.
        Attributes:
            monitor: the :class:`~healthmon.Monitor` while training, else None.
        Raises:
            TypeError / ValueError: an unknown or invalid option (at construction).
        """

        def __init__(self, max_modules: int = 32, **watch_options):
            super().__init__()
            self.session = TrainerSession(watch_options, max_modules)

        @property
        def monitor(self):
            return self.session.active_monitor()

        def on_train_start(self, trainer, pl_module) -> None:
            self.session.start(pl_module, trainer.global_step)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.session.at_step(trainer.global_step)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            # global_step has moved on when the optimizer stepped in this batch: end the
            # step here, before validation, checkpointing and the next batch
            self.session.at_step(trainer.global_step)
            if trainer.loggers:
                self._log(trainer)

        def _log(self, trainer) -> None:
            every = max(int(getattr(trainer, "log_every_n_steps", 50) or 1), 1)
            mon = self.session.monitor
            step = mon.last_step if mon is not None else None
            if step is None or (step + 1) % every:
                return  # Lightning's own cadence: global steps every-1, 2*every-1, ...
            got = self.session.new_metrics()
            if got is None:
                return
            step, metrics = got
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

        def on_train_end(self, trainer, pl_module) -> None:
            self.session.finish()

        def on_exception(self, trainer, pl_module, exception) -> None:
            self.session.abort()

        def teardown(self, trainer, pl_module, stage) -> None:
            self.session.abort()

    HealthmonCallback.__module__ = __name__
    HealthmonCallback.__qualname__ = "HealthmonCallback"
    return HealthmonCallback


def _default_package() -> ModuleType:
    try:
        return importlib.import_module("lightning.pytorch")
    except ImportError:
        try:
            return importlib.import_module("pytorch_lightning")
        except ImportError:
            raise ImportError("healthmon.integrations.lightning needs Lightning: "
                              "pip install lightning (or pytorch_lightning)") from None


HealthmonCallback = callback_class(_default_package())
