"""IDs that become file names: slide and patient IDs, map names, checkpoint names.

An ID read from a CSV, a command line or a file's attrs names files such as
``<out>/attention/<slide>.h5``; one with a separator, ``..`` or a drive would name a file
elsewhere, over another one. Every such ID passes ``check_name`` before it is joined to a folder.
"""

from __future__ import annotations

from pathlib import PurePosixPath, PureWindowsPath

from napari_mil.errors import NapariMilError


class UnsafeNameError(NapariMilError, ValueError):
    """An ID that cannot name a file: it would reach outside its folder."""


def unsafe_name(name: str) -> str | None:
    """Why ``name`` cannot name a file in a folder (None when it can)."""
    if not isinstance(name, str):
        return f"it is a {type(name).__name__}, not text"
    if not name:
        return "it is empty"
    for bad in ("/", "\\", ".."):
        if bad in name:
            return f"it contains {bad!r}"
    if any(ord(ch) < 32 for ch in name):
        return "it contains a control character"
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive:
        return "it is an absolute path"
    return None


def check_name(name: str, what: str = "slide ID") -> str:
    """``name`` when it can name a file, else UnsafeNameError saying why."""
    why = unsafe_name(name)
    if why:
        raise UnsafeNameError(f"{what} {name!r} cannot name a file ({why}): IDs are file names without a folder")
    return name
