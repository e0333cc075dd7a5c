"""What `python -m mim_jax.main` (and bench, visualize, export) prints: this project's INFO lines,
as bare messages, and everyone's warnings and errors, not the INFO chatter of orbax, TFDS, clu and
JAX (`--verbosity=0` or higher brings both back); progress lines for long tasks (`Progress`); a
command line that cannot be parsed as one message with its fix instead of a traceback."""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep   # mim_jax/


# Warnings orbax gives for every read of a finished run's checkpoints (evaluation, export), which
# opens them read-only and restores items one at a time: expected, and nothing to act on.
_EXPECTED_WARNINGS = ("Given directory is read only", "Metadata file does not exist: ")


class _OwnInfoOnly(logging.Filter):
    """Passes warnings and errors, and INFO only from this package's files."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.pathname.startswith(PACKAGE_DIR):
            return True
        if record.levelno == logging.WARNING and str(record.msg).startswith(_EXPECTED_WARNINGS):
            return False
        return record.levelno >= logging.WARNING


def duration(seconds: float) -> str:
    """12m05s, or 2h46m past an hour."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Progress lines for a long task (a pass over a data set, a probe's epochs):
    `<what>: 12,288/60,000 images (20%), 1m05s left`.

    The first line comes after `every_s` seconds (30), the next ones once `every_s` and a tenth of
    the task have passed since the previous line, or after `quiet_s` (300) in any case: a task
    shorter than `every_s` prints nothing, a long one about ten lines.
    """

    def __init__(self, what: str, total: int, unit: str = "", *, every_s: float = 30.0, quiet_s: float = 300.0,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit = what, total, f" {unit}" if unit else ""
        self.every_s, self.quiet_s, self.clock = every_s, quiet_s, clock
        self.start = self.last = clock()
        self.last_done = 0

    def update(self, done: int) -> None:
        now = self.clock()
        since = now - self.last
        if not 0 < done < self.total or since < self.every_s:
            return
        first = self.last == self.start
        if not first and done - self.last_done < self.total / 10 and since < self.quiet_s:
            return
        self.last, self.last_done = now, done
        left = (now - self.start) * (self.total - done) / done
        logging.info("%s: %s/%s%s (%d%%), %s left", self.what, f"{done:,}", f"{self.total:,}", self.unit,
                     100 * done // self.total, duration(left))


def quiet_unless_verbose():
    """`quiet_third_party_info` and `plain_info_lines` unless the command line gave --verbosity
    (absl's flag): then everything shows, in absl's format."""
    from absl import flags
    if not flags.FLAGS["verbosity"].present:
        quiet_third_party_info()
        plain_info_lines()


def plain_info_lines():
    """INFO lines on the console as their bare message (`step 120/938  loss 0.81 ...`), without absl's
    `I1203 22:31:39.123456 12345 train.py:123] ` prefix (absl's --showprefixforinfo=false, unless
    given). Warnings and errors keep the prefix, and so does a log file (absl's --log_dir), where
    absl adds it whatever the flag says."""
    from absl import flags
    if not flags.FLAGS["showprefixforinfo"].present:
        flags.FLAGS.showprefixforinfo = False


def quiet_third_party_info():
    """Keeps other libraries' INFO records off the console (absl's handler, where every library's
    records end up); they stay available with an explicit --verbosity."""
    from absl import logging as absl_logging
    handler = absl_logging.get_absl_handler()
    if not any(isinstance(f, _OwnInfoOnly) for f in handler.filters):
        handler.addFilter(_OwnInfoOnly())


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing for the commands that take --config (main, bench), with a missing config
    file, a bad config argument or an unknown --config.* key as one line, not the traceback
    config_flags and ml_collections print."""
    from absl import flags
    missing = missing_config_file(argv)
    if missing:
        sys.stderr.write(f"FATAL: {missing}\n")
        sys.exit(1)
    # Building the config can read another run's checkpoints (a CAE v2 teacher run:DIR, finetune's
    # init=DIR), and orbax logs while it does: filtered from the start, its expected read-only
    # warnings stay off the console, and with them absl's "Logging before flag parsing" notice.
    if not _asks_for_verbosity(argv):
        quiet_third_party_info()
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as error:
        sys.stderr.write(f"FATAL: {flag_error_message(error, argv)}\n")
        sys.exit(1)


def _asks_for_verbosity(argv: list[str]) -> bool:
    return any(arg.split("=", 1)[0] in ("--verbosity", "-v", "--v") for arg in argv[1:])


def missing_config_file(argv: list[str]) -> str | None:
    """One line for a --config file that does not exist, listing the configs there are; None when
    it exists (or no --config is given). config_flags itself defers that error to the config's first
    use, where it surfaces as a long traceback."""
    spec = _config_spec(argv)
    if spec is None:
        return None
    path = spec.partition(":")[0]
    if os.path.isfile(path):
        return None
    folder = os.path.dirname(path)
    if os.path.isdir(folder or "."):
        available = [os.path.join(folder, name) for name in _config_files(folder or ".")]
    else:   # e.g. run from outside the repository: the repository's own configs
        folder = os.path.join(os.path.dirname(PACKAGE_DIR.rstrip(os.sep)), "configs")
        available = [os.path.join(folder, name) for name in _config_files(folder)]
    listing = f"available configs: {', '.join(available)}" if available else f"no configs in {folder or '.'}"
    return f"--config={spec}: there is no file {path}; {listing}."


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config (`--config=X` or `--config X`), the last one given."""
    spec = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            spec = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _config_files(folder: str) -> list[str]:
    """The config files of a folder: Python files that define get_config."""
    names = []
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if name.endswith(".py") and os.path.isfile(full):
            with open(full, encoding="utf-8", errors="replace") as f:
                if "def get_config(" in f.read():
                    names.append(name)
    return names


def flag_error_message(error: BaseException, argv: list[str]) -> str:
    """One paragraph for a command line that does not parse: the config file's own error (its last
    line, not the traceback config_flags embeds), or the --config.* key that does not exist."""
    text = str(error).strip()
    if isinstance(error, AttributeError) or "has no attribute" in text or text.startswith("\"'"):
        unknown = _unknown_override(argv)
        if unknown:
            return unknown
    if "Traceback (most recent call last)" in text:
        last = [line for line in text.splitlines() if line.strip()][-1].strip()
        flag = text.split(":", 1)[0]
        return f"{flag}: {last.split(': ', 1)[-1]}"
    return text.splitlines()[0] if text else type(error).__name__


def _unknown_override(argv: list[str]) -> str | None:
    import importlib.util
    spec = _config_spec(argv)
    if spec is None:
        return None
    try:   # the config file as config_flags loads it: a path, then get_config(arg)
        path, _, arg = spec.partition(":")
        module_spec = importlib.util.spec_from_file_location("_config_being_checked", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        config = module.get_config(arg or None) if arg else module.get_config()
    except Exception:  # noqa: BLE001 (the config's own error is reported instead)
        return None
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        path = arg[len("--config."):].split("=", 1)[0].split(".")
        node = config
        for depth, key in enumerate(path):
            if not hasattr(node, "keys") or key not in node:
                where = "--config." + ".".join(path[:depth]) if depth else "the config"
                options = sorted(node.keys()) if hasattr(node, "keys") else []
                known = f"; {where} has: {', '.join(options)}" if options else ""
                return (f"--config.{'.'.join(path)}: {spec} has no key {key!r}{known}. Check the spelling "
                        "(python -m mim_jax.main --config=... --helpfull lists every flag).")
            node = node[key]
    return None
