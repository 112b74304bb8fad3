"""Errors that reach users: each carries a one-line message that says what to do."""


class NapariMilError(Exception):
    """Base class for errors with a message meant for the user."""


class SlideOpenError(NapariMilError):
    """The file is missing, is not a slide, is corrupt or is in an unsupported format."""


class SlideReadError(NapariMilError):
    """A region of an opened slide cannot be read (damaged tile data, a file changed on disk)."""


class MemoryCapError(NapariMilError):
    """What the input asks for (a thumbnail, a mask) would exceed a memory cap; the message
    names the parameter that raises the cap."""


class MissingMppError(NapariMilError):
    """The slide records no microns-per-pixel and none was given."""


class InvalidMppError(NapariMilError, ValueError):
    """A microns-per-pixel value outside the range any scanner produces."""


class NoTissueError(NapariMilError):
    """Tissue detection (or the user's edits) left no tissue to tile."""


class GridError(NapariMilError, ValueError):
    """Patch-grid parameters that cannot be satisfied on this slide."""


class EncoderError(NapariMilError):
    """An encoder that cannot be created: unknown name, bad weights, unauthorised hub model."""


class FeatureStoreError(NapariMilError):
    """A feature file that cannot be read or does not fit what is asked of it."""


class ExtractionCancelled(NapariMilError):
    """Feature extraction stopped on request; finished chunks are kept on disk."""


def os_error_message(exc: OSError, path=None) -> str:
    """One line for a file-system error: the path, what went wrong and what to do."""
    import errno

    where = path if path is not None else (exc.filename if exc.filename is not None else None)
    code = getattr(exc, "errno", None)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        said = "permission denied (a read-only folder or disk?): fix its permissions or choose another folder"
    elif code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        said = "the disk is full: free some space (or choose another disk) and run again"
    elif code in (errno.EEXIST, errno.ENOTDIR):
        said = "a file is in the way where a folder is needed: give a folder, or move the file"
    elif code == errno.EISDIR:
        said = "is a folder, not a file: give the file"
    elif code == errno.ENOENT:
        said = "does not exist: check the path"
    elif code == errno.ENAMETOOLONG:
        said = "the name is too long: choose a shorter path"
    else:
        said = f"{exc.strerror or exc}: check the file and the disk"
    return f"{where}: {said}" if where is not None else said
