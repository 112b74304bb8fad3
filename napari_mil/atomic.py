"""Atomic writes: a file is either its old self or complete, never half-written.

Every writer of the package goes through ``atomic_path``: it writes to a temporary file in the
same folder (named after the process and thread, so two writers of one file never share it) and
renames it into place only when the writing finished without an error.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; it replaces ``path`` when the block
    ends without an error, and is removed otherwise. The folder is created when missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data) -> Path:
    """JSON, indented; numpy scalars become numbers, paths and other objects strings."""
    return write_text(path, json.dumps(data, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def write_csv(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Rows (dicts with the same keys, the first row's order) as CSV."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)
