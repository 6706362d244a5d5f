"""The monitor's options: explicit ``watch()`` arguments and the ``HEALTHMON*`` environment.

=======================  ==========================================================
``HEALTHMON``            ``off``/``0``/``false``/``no``: watch() returns an inert monitor
                         (no hooks at all; wins over every argument, the production kill
                         switch). ``on``/``1``/``true``/``yes``/``async``: asynchronous
                         checks at step boundaries (the default). ``sync``: check inside
                         each hook and raise there.
``HEALTHMON_EVERY``      integer N >= 1: monitor one step in N (default 1).
``HEALTHMON_ON_ANOMALY`` ``raise`` (default) / ``warn`` / ``log`` / ``skip`` (a step whose
                         records hold NaN/Inf does not update the weights; see
                         :meth:`healthmon.Monitor` and the README).
``HEALTHMON_MAX_SKIPS``  with ``skip``: consecutive skipped steps before raising (default 3).
``HEALTHMON_LOG``        path of a JSONL log (one line per site per monitored step, plus
                         anomalies); empty or unset: no log. A directory is a ValueError.
``HEALTHMON_ALLOW_INF``  comma-separated fnmatch patterns of sites (or ``site.role``) whose
                         forward outputs / inputs may hold ±Inf; added to ``allow_inf=``.
``HEALTHMON_WARN``       ``off``/``0``/``false``/``no``: no early warnings (wins over
                         ``watch(warn=...)``); ``on``/``1``/``true``/``yes`` (default).
``HEALTHMON_WARN_BUDGET`` the rules' share of a step's wall time (default 0.05; ``1``: every
                         step); read by :func:`healthmon.rules.resolve_warn`.
=======================  ==========================================================

Explicit arguments win over the environment, except ``HEALTHMON=off``. Unknown values are a
``ValueError`` naming the variable (or argument) and the accepted values, raised at watch().
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Tuple, Union

ON_ANOMALY = ("raise", "warn", "log", "skip")
_OFF = ("off", "0", "false", "no")
_ASYNC = ("on", "1", "true", "yes", "async")
_SYNC = ("sync",)
HEALTHMON_VALUES = _OFF + _ASYNC + _SYNC


@dataclass(frozen=True)
class Config:
    """Resolved options of one monitor."""
    enabled: bool = True
    sync: bool = False
    every: int = 1
    on_anomaly: str = "raise"
    log: Optional[str] = None
    max_skips: int = 3
    allow_inf: Tuple[str, ...] = ()
    warn: bool = True  # HEALTHMON_WARN: early warnings on (healthmon.rules)


def _env(environ: Mapping[str, str], name: str) -> Optional[str]:
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value if value else None


def parse_every(value, what: str) -> int:
    """``value`` as an int >= 1 or a ValueError naming ``what``."""
    if isinstance(value, bool):
        raise ValueError(f"healthmon: {what} must be an integer >= 1, got {value!r}")
    try:
        n = int(value)
        if isinstance(value, float) and n != value:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"healthmon: {what} must be an integer >= 1, got {value!r}") from None
    if n < 1:
        raise ValueError(f"healthmon: {what} must be an integer >= 1, got {value!r}")
    return n


def parse_on_anomaly(value, what: str) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else None
    if text not in ON_ANOMALY:
        raise ValueError(f"healthmon: {what} must be one of {', '.join(ON_ANOMALY)}; "
                         f"got {value!r}")
    return text


def parse_allow_inf(value: Union[str, Iterable[str], None], what: str) -> Tuple[str, ...]:
    """fnmatch patterns from a comma-separated string or an iterable of strings."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"healthmon: {what} must hold strings (fnmatch patterns of site "
                            f"names), got {type(item).__name__}")
        if item.strip():
            out.append(item.strip())
    return tuple(out)


def resolve(every=None, sync=None, on_anomaly=None, log=None, allow_inf=None,
            environ: Optional[Mapping[str, str]] = None) -> Config:
    """Merge explicit arguments (None: not given) with the environment.

    ``allow_inf`` patterns are the union of the argument's and ``HEALTHMON_ALLOW_INF``'s.

    Raises:
        ValueError: an invalid ``HEALTHMON*`` value or argument (names it and the accepted
            values). Every variable is validated, even those an argument overrides.
    """
    env = os.environ if environ is None else environ
    mode = _env(env, "HEALTHMON")
    enabled, env_sync = True, False
    if mode is not None:
        m = mode.lower()
        if m in _OFF:
            enabled = False
        elif m in _SYNC:
            env_sync = True
        elif m not in _ASYNC:
            raise ValueError(f"healthmon: HEALTHMON={mode!r} is not valid; accepted values: "
                             f"{', '.join(HEALTHMON_VALUES)}")
    env_every = _env(env, "HEALTHMON_EVERY")
    env_every = parse_every(env_every, "HEALTHMON_EVERY") if env_every is not None else 1
    env_on = _env(env, "HEALTHMON_ON_ANOMALY")
    env_on = parse_on_anomaly(env_on, "HEALTHMON_ON_ANOMALY") if env_on is not None else "raise"
    env_log = _env(env, "HEALTHMON_LOG")
    env_skips = _env(env, "HEALTHMON_MAX_SKIPS")
    max_skips = parse_every(env_skips, "HEALTHMON_MAX_SKIPS") if env_skips is not None else 3
    env_warn = _env(env, "HEALTHMON_WARN")
    if env_warn is not None and env_warn.lower() not in _OFF + _ASYNC[:4]:
        raise ValueError(f"healthmon: HEALTHMON_WARN={env_warn!r} is not valid; accepted "
                         f"values: {', '.join(_OFF + _ASYNC[:4])}")

    if sync is not None and not isinstance(sync, bool):
        raise ValueError(f"healthmon: sync must be True, False or None, got {sync!r}")
    cfg_every = parse_every(every, "every") if every is not None else env_every
    cfg_on = parse_on_anomaly(on_anomaly, "on_anomaly") if on_anomaly is not None else env_on
    if log is not None and not isinstance(log, (str, os.PathLike)):
        raise TypeError(f"healthmon: log must be a path, got {type(log).__name__}")
    cfg_log = os.fspath(log) if log is not None else env_log
    if cfg_log and os.path.isdir(cfg_log):
        source = "log" if log is not None else "HEALTHMON_LOG"
        raise ValueError(f"healthmon: {source}={cfg_log!r} is a directory; it must name the "
                         f"JSONL file to write, e.g. {os.path.join(cfg_log, 'healthmon.jsonl')!r}")
    patterns = parse_allow_inf(allow_inf, "allow_inf")
    for pat in parse_allow_inf(_env(env, "HEALTHMON_ALLOW_INF"), "HEALTHMON_ALLOW_INF"):
        if pat not in patterns:
            patterns += (pat,)
    return Config(enabled=enabled, sync=env_sync if sync is None else sync, every=cfg_every,
                  on_anomaly=cfg_on, log=cfg_log or None, max_skips=max_skips,
                  allow_inf=patterns,
                  warn=env_warn is None or env_warn.lower() not in _OFF)
