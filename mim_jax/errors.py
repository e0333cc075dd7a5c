"""The project's expected failures: their message is one paragraph naming what was wrong and the fix,
so `mim_jax.main` prints it without a traceback."""
from __future__ import annotations


class UserFacingError(Exception):
    exit_code = 1   # what the command exits with


class WeightsNotFoundError(UserFacingError, FileNotFoundError):
    """A run, weight file or teacher that is not where the config says."""


class ConfigError(UserFacingError, ValueError):
    """A config that cannot run, found before anything is built or compiled."""
