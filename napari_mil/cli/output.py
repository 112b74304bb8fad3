"""What the commands print: progress bars (whole lines in a log), errors, warnings and notes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from napari_mil.errors import NapariMilError, os_error_message


def error(message) -> None:
    print(f"error: {message}", file=sys.stderr)


def warning(message) -> None:
    print(f"warning: {message}", file=sys.stderr)


def note(message) -> None:
    print(f"note: {message}", file=sys.stderr)


class UsageError(NapariMilError):
    """The command cannot start with these arguments (exit code 2, as argparse's own errors)."""


def output_folder(path) -> Path:
    """The --out folder, made when missing; a UsageError that says what to do when it cannot be
    (a file in the way) or cannot be written to (checked before any work, not at its end)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(os_error_message(exc, out)) from None
    if not os.access(out, os.W_OK):
        raise UsageError(f"{out}: the folder is not writable: fix its permissions or choose another --out")
    return out


def failure(exc: Exception) -> str:
    """A slide's error as one line: the core's message, or a file-system error with its path."""
    return os_error_message(exc) if isinstance(exc, OSError) else str(exc)


def write_line(message: str, file=None) -> None:
    """A line that does not break a tqdm bar on the terminal."""
    from tqdm import tqdm

    tqdm.write(message, file=file)


def progress_bar(iterable=None, *, lines: bool = False, disable: bool = False, **kwargs):
    """A tqdm bar where stderr is a terminal. Where it is not (a log file), no bar and no
    carriage returns: with ``lines``, one line per ``set_postfix``/``refresh`` (the training
    bars: a line per epoch), else nothing (the commands print a line per slide themselves)."""
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, disable=disable, **kwargs)
    return LogLines(iterable, disable=disable or not lines, **kwargs)


class LogLines:
    """What stands in for a tqdm bar in a log: the same calls, whole lines only."""

    def __init__(self, iterable=None, total=None, desc="", unit="it", disable=False, **_):
        self.iterable, self.total, self.desc, self.unit, self.disable = iterable, total, desc, unit, disable
        self.n, self.postfix = 0, {}

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.n += 1

    def update(self, n=1):
        self.n += n

    def set_postfix(self, refresh=True, **values):
        self.postfix = values
        if refresh:
            self.refresh()

    def refresh(self):
        if not self.disable:
            extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
            print(f"{self.desc}: {self.unit} {self.n}{f'/{self.total}' if self.total else ''}{extra}",
                  file=sys.stderr, flush=True)

    def close(self):
        pass


class TileBar:
    """A slide's extraction bar, made at the first report (which knows the patch count); a
    callable for ``progress``."""

    def __init__(self, desc: str, disable: bool = False):
        self.desc, self.disable, self.bar = desc, disable, None

    def __call__(self, report) -> None:
        if self.bar is None:
            self.bar = progress_bar(total=report.total, desc=self.desc, unit="tile", disable=self.disable, leave=False)
        self.bar.n = report.done
        self.bar.set_postfix(tiles_s=f"{report.tiles_per_s:.0f}", eta=f"{report.eta_s:.0f}s",
                             batch=report.batch_size, refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
