"""Trainer integrations: callbacks that let a trainer drive the monitor.

* :mod:`healthmon.integrations.lightning`: ``HealthmonCallback`` for
  ``lightning.Trainer(callbacks=[...])`` (``pytorch_lightning`` too).
* :mod:`healthmon.integrations.hf`: ``HealthmonCallback`` for
  ``transformers.Trainer(callbacks=[...])``.
* :mod:`healthmon.integrations.autopatch`: what ``python -m healthmon run`` uses to add those
  callbacks to trainers built by an unmodified script.

Nothing here imports lightning or transformers until one of those submodules is imported
(``import healthmon`` never does). The shared parts: :mod:`.session` (the monitor's life
driven by trainer events: watch, the trainer's global step as the step, check, remove) and
:mod:`.metrics` (decoded rows -> a bounded dict of per-layer health metrics).
"""
