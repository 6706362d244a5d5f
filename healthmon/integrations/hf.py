"""Hugging Face ``transformers.Trainer``: ``Trainer(callbacks=[HealthmonCallback()])``.

```python
from transformers import Trainer
from healthmon.integrations.hf import HealthmonCallback

trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[HealthmonCallback()])
trainer.train()
```

* The model is watched at ``on_train_begin`` and unwatched at ``on_train_end`` and when this
  callback raises.
* Steps are ``state.global_step`` (optimizer updates), set at ``on_step_begin`` (the first
  micro-batch of an update: gradient accumulation is one step) and at ``on_step_end``
  (after the update, before logging, evaluation and saving), so ``evaluate()`` passes never
  start a step; their records belong to the step that follows.
* A :class:`~healthmon.HealthError` is raised from ``on_step_end`` of the bad step on CPU
  (``on_step_begin``/``on_step_end`` one update later on accelerators, where records are
  decoded one step late), or from ``on_train_end`` for the last step, so ``trainer.train()``
  raises it with the step's number.
* ``on_log`` adds the last decoded step's health metrics
  (:func:`~healthmon.integrations.metrics.health_metrics`) to ``logs`` and to the matching
  ``state.log_history`` entry. Callbacks run in list order and the Trainer puts the
  ``report_to`` integrations before the ones passed in ``callbacks=[...]``: use
  :func:`add_to` (it puts this callback first) for the metrics to reach those backends.

transformers has no exception event for callbacks: when other code raises inside ``train()``,
the hooks stay until :meth:`HealthmonCallback.remove` or the next ``train()`` (under
``healthmon run`` they are removed when ``train()`` exits).
"""
from __future__ import annotations

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError("healthmon.integrations.hf needs transformers: pip install transformers "
                      "accelerate (with your torch pinned in the same command)") from None

from .session import TrainerSession


class HealthmonCallback(TrainerCallback):
    """Watches the model during ``Trainer.train()`` with ``state.global_step`` as the step.

    Args:
        max_modules: modules given their own logged metrics (default 32).
        **watch_options: :func:`healthmon.watch` options (``every``, ``sync``,
            ``on_anomaly``, ``log``, ``allow_inf``, ``sinks``, ``prefix``); the ``HEALTHMON*``
            environment applies as in ``watch``.
    Attributes:
        monitor: the :class:`~healthmon.Monitor` while training, else None.
    Raises:
        TypeError / ValueError: an unknown or invalid option (at construction).
    """

    def __init__(self, max_modules: int = 32, **watch_options):
        self.session = TrainerSession(watch_options, max_modules)

    @property
    def monitor(self):
        return self.session.active_monitor()

    def remove(self) -> None:
        """Remove the monitor's hooks now (after an exception raised by other code)."""
        self.session.abort()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise RuntimeError("healthmon: the Trainer passed no model to on_train_begin; "
                               "use healthmon.watch(model) in your own loop instead")
        self.session.start(model, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.session.at_step(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.session.at_step(state.global_step)  # the update is done: end its step now

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None:
            return
        got = self.session.new_metrics()
        if got is None:
            return
        _, metrics = got
        logs.update(metrics)
        history = state.log_history
        if history and history[-1].get("step") == state.global_step:
            history[-1].update(metrics)  # Trainer.log appended a copy of `logs` before

    def on_train_end(self, args, state, control, **kwargs):
        self.session.finish()


def add_to(trainer, **options) -> HealthmonCallback:
    """Add a :class:`HealthmonCallback` to ``trainer`` as its *first* callback, so its
    metrics are in ``logs`` before the ``report_to`` integrations see them.

    Args:
        trainer: a ``transformers.Trainer``.
        **options: ``HealthmonCallback`` arguments.
    Returns:
        the callback (``trainer.remove_callback(cb)`` takes it out).
    """
    cb = HealthmonCallback(**options)
    trainer.callback_handler.callbacks.insert(0, cb)
    return cb
