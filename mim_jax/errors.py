"""The project's expected failures: their message is one paragraph naming what was wrong and the fix,
so `mim_jax.main` prints it without a traceback."""
from __future__ import annotations


class UserFacingError(Exception):
    exit_code = 1   # what the command exits with


class WeightsNotFoundError(UserFacingError, FileNotFoundError):
    """A run, weight file or teacher that is not where the config says."""


class WeightsError(UserFacingError, ValueError):
    """A weight file that cannot be read, or not as asked (wrong layout, truncated, an
    architecture its layout cannot hold)."""


class ConfigError(UserFacingError, ValueError):
    """A config that cannot run, found before anything is built or compiled."""
