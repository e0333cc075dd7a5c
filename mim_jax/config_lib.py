"""Config helpers: big_vision-style `get_config(arg)` argument parsing and unit-free durations."""
from __future__ import annotations

import math

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'variant=B/16,local' -> ConfigDict(variant='B/16', local=True, <other defaults>).

    Values take the type of their default; a bare word sets a boolean flag; an unknown name is an
    error that lists the accepted ones.
    """
    parsed = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            raise ValueError(f"Unknown config argument {key!r} in {arg!r}; accepted: {sorted(defaults)}.")
        default = defaults[key]
        if not sep:
            parsed[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"Config argument {key!r} expects true/false, got {value!r}.")
            parsed[key] = value.lower() in ("true", "1")
        elif default is None or isinstance(default, str):
            parsed[key] = value
        else:
            try:
                parsed[key] = type(default)(value)
            except ValueError as e:
                raise ValueError(f"Config argument {key!r} expects {type(default).__name__}, got {value!r}.") from e
    return ml_collections.ConfigDict(parsed)


def given_args(arg: str | None) -> frozenset[str]:
    """The argument names written in 'variant=B/16,local' ({'variant', 'local'}): what a preset
    such as `local` must leave as the user set it."""
    return frozenset(item.partition("=")[0].strip() for item in filter(None, (arg or "").split(",")))


def steps(config, prefix: str, *, steps_per_epoch: float, total_steps: int | None = None,
          default: int | None = None) -> int | None:
    """Reads `{prefix}_steps`, `{prefix}_epochs` or `{prefix}_percent` (of total_steps): the first
    one set wins, in that order, so `--config.total_steps=20` shortens any run. Only some durations
    have a `_percent` (the warm-up's)."""
    value = config[f"{prefix}_steps"]
    if value is not None:
        return int(value)
    value = config[f"{prefix}_epochs"]
    if value is not None:
        return max(int(math.ceil(value * steps_per_epoch)), 1)
    value = config[f"{prefix}_percent"] if f"{prefix}_percent" in config else None
    if value is not None:
        if total_steps is None:
            raise ValueError(f"{prefix}_percent needs a known total number of steps.")
        return int(value * total_steps)
    return default
