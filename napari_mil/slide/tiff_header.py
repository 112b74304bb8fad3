"""Checks of a TIFF file's structure before a C library reads it.

OpenSlide sizes its buffers from header values (a tile's width x height, a tile's byte count)
and aborts the whole process when such an allocation fails: no Python ``try`` can catch that.
So the image file directories (IFDs) of classic and BigTIFF files are parsed here with
``struct``, decoding no pixels, and a file is refused with a SlideOpenError when its tiles are
implausibly large, its tile or strip tables lie outside it or do not cover the image, or a tile's
byte count exceeds the whole file. Opening a slide must not get noticeably slower: the checks
read a few kB and the byte-count tables, and test long tables with numpy.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np

from napari_mil.errors import SlideOpenError

# Bytes per value of each TIFF field type (TIFF 6.0 and BigTIFF).
TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
# The integer types, which sizes and offsets may have (read as libtiff does: signed ones must be >= 0).
INTEGERS = {1: "u1", 3: "u2", 4: "u4", 13: "u4", 16: "u8", 18: "u8", 6: "i1", 8: "i2", 9: "i4", 17: "i8"}
BIG_ONLY = (16, 17, 18)  # 64-bit types exist only in BigTIFF
SIGNED = (6, 8, 9, 17)
UNSIGNED_SIZES = {1: 1, 3: 2, 4: 4}  # the types of most size tags
STRUCT_CODES = {1: "B", 3: "H", 4: "I", 13: "I", 16: "Q", 18: "Q", 6: "b", 8: "h", 9: "i", 17: "q"}
SHORT_TABLE = 256  # byte-count tables up to this long are checked in Python, longer ones with numpy
WINDOW = 4096  # bytes read at a time
DTYPES = {order: {typ: np.dtype(code).newbyteorder(order) for typ, code in INTEGERS.items()} for order in "<>"}

IMAGE_WIDTH, IMAGE_LENGTH, STRIP_OFFSETS, SAMPLES_PER_PIXEL, ROWS_PER_STRIP = 256, 257, 273, 277, 278
STRIP_BYTE_COUNTS, PLANAR_CONFIG, TILE_WIDTH, TILE_LENGTH, TILE_OFFSETS, TILE_BYTE_COUNTS = 279, 284, 322, 323, 324, 325
SUB_IFDS = 330
NAMES = {IMAGE_WIDTH: "ImageWidth", IMAGE_LENGTH: "ImageLength", STRIP_OFFSETS: "StripOffsets",
         SAMPLES_PER_PIXEL: "SamplesPerPixel", ROWS_PER_STRIP: "RowsPerStrip", STRIP_BYTE_COUNTS: "StripByteCounts",
         PLANAR_CONFIG: "PlanarConfiguration", TILE_WIDTH: "TileWidth", TILE_LENGTH: "TileLength",
         TILE_OFFSETS: "TileOffsets", TILE_BYTE_COUNTS: "TileByteCounts", SUB_IFDS: "SubIFDs"}

# Scanners write tiles of 240-2048 px; OpenSlide allocates width x height x 4 bytes per tile read.
MAX_TILE_SIDE = 16384
MAX_TILE_PIXELS = 8192 * 8192
MAX_IFDS = 4096
# Hamamatsu NDPI keeps the high bits of its offsets outside the TIFF structure: not checkable here.
UNCHECKED_EXTENSIONS = (".ndpi",)


def check_tiff_header(path: str | os.PathLike) -> None:
    """Raise SlideOpenError when the TIFF structure of ``path`` is inconsistent with its size.

    Files that are not TIFF (other vendor formats) and folders are left to their readers."""
    name = os.path.basename(os.fspath(path))
    if name.lower().endswith(UNCHECKED_EXTENSIONS):
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError:  # a folder (DICOM), or unreadable: the readers say why
        return
    try:
        info = os.fstat(fd)
        if stat.S_ISREG(info.st_mode):
            _Reader(fd, info.st_size).check_all()
    except _Corrupt as exc:
        raise SlideOpenError(f"{name} is not a readable slide: corrupt TIFF structure: {exc}") from None
    finally:
        os.close(fd)


def _seek_read(fd: int, nbytes: int, offset: int) -> bytes:
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, nbytes)


_pread = getattr(os, "pread", _seek_read)  # one system call where the platform has it


class _Corrupt(Exception):
    pass


class _Layout:
    """The structs of one flavour of TIFF: byte order, classic or BigTIFF."""

    def __init__(self, order: str, big: bool):
        self.order, self.big = order, big
        self.byteorder = "little" if order == "<" else "big"
        self.count = struct.Struct(order + ("Q" if big else "H"))
        self.entry = struct.Struct(order + ("HHQ8s" if big else "HHI4s"))
        self.offset = struct.Struct(order + ("Q" if big else "I"))
        self.dtypes = DTYPES[order]


LAYOUTS = {(order, big): _Layout(order, big) for order in "<>" for big in (False, True)}


class _Reader:
    def __init__(self, fd: int, size: int):
        self.fd, self.size = fd, size
        self.tables = []  # long byte-count tables: (IFD index, "tile" or "strip", field type, bytes)
        self.layout = None
        self._window = (0, b"")
        head = self.window(0, 16)
        order = {b"II": "<", b"MM": ">"}.get(head[:2]) if len(head) >= 8 else None
        if order is None:
            return  # not a TIFF
        magic = int.from_bytes(head[2:4], "little" if order == "<" else "big")
        if magic == 42 or (magic == 43 and len(head) == 16):
            self.layout = lay = LAYOUTS[order, magic == 43]
            self.order, self.big, self.byteorder = order, lay.big, lay.byteorder
            self.first = lay.offset.unpack_from(head, 8 if lay.big else 4)[0]

    def read(self, offset: int, nbytes: int, what: str) -> bytes:
        if offset + nbytes > self.size:
            raise _Corrupt(f"{what} ({nbytes} bytes at {offset}) lies beyond the end of the {self.size}-byte file")
        return self.window(offset, nbytes)

    def window(self, offset: int, nbytes: int) -> bytes:
        """``nbytes`` at ``offset`` (fewer at the end of the file), read WINDOW bytes at a time: an
        IFD's tables usually lie just after it, so one system call often serves both."""
        start, data = self._window
        if start <= offset and offset + nbytes <= start + len(data):
            return data[offset - start : offset - start + nbytes]
        data = _pread(self.fd, max(nbytes, WINDOW), offset)
        self._window = (offset, data)
        return data[:nbytes]

    def check_all(self) -> None:
        if self.layout is None:
            return
        queue, seen, index = [self.first], set(), 0
        while queue:
            offset = queue.pop(0)
            if offset == 0 or offset in seen:  # SubIFDs are listed and chained: each is checked once
                continue
            if len(seen) >= MAX_IFDS:
                raise _Corrupt(f"more than {MAX_IFDS} image directories")
            seen.add(offset)
            entries, next_offset = self.directory(offset, index)
            self.check_image(entries, index)
            if SUB_IFDS in entries:
                queue.extend(int(v) for v in self.array(entries, SUB_IFDS, index))
            queue.append(next_offset)
            index += 1
        self.check_tables()

    def directory(self, offset: int, index: int) -> tuple[dict, int]:
        """The entries of one IFD (tag -> (tag, type, count, value field)) and the next IFD's offset."""
        lay = self.layout
        width, entry_size = lay.count.size, lay.entry.size
        # one read for the usual IFD (up to 32 entries), a second one for longer ones
        raw = self.window(offset, width + 32 * entry_size + lay.offset.size)
        if len(raw) < width:
            raise _Corrupt(f"directory {index} ({width} bytes at {offset}) lies beyond the end of the file")
        n = lay.count.unpack_from(raw)[0]
        if n == 0:
            raise _Corrupt(f"directory {index} has no entries")
        end = width + n * entry_size
        if end + lay.offset.size > len(raw):
            raw = self.read(offset, end + lay.offset.size, f"directory {index}")
        entries = {e[0]: e for e in lay.entry.iter_unpack(raw[width:end])}
        if len(entries) < n:  # a repeated tag: readers keep the first, so the first one is written last
            entries = {e[0]: e for e in reversed(list(lay.entry.iter_unpack(raw[width:end])))}
        return entries, lay.offset.unpack_from(raw, end)[0]

    def raw(self, entries: dict, tag: int, index: int, read: bool = True) -> tuple[int, int, bytes]:
        """(type, count, the bytes of the values) of an integer tag, read from the file when not
        inline (with ``read=False``, only checked to lie inside the file)."""
        _, typ, count, field = entries[tag]
        if typ not in INTEGERS or (typ in BIG_ONLY and not self.big):
            raise _Corrupt(f"{NAMES[tag]} of directory {index} has field type {typ}, not an integer")
        if count == 0:
            raise _Corrupt(f"{NAMES[tag]} of directory {index} has no values")
        nbytes = count * TYPE_SIZES[typ]
        if nbytes <= len(field):
            return typ, count, field[:nbytes]
        at = int.from_bytes(field, self.byteorder)
        if not read:
            if at + nbytes > self.size:
                raise _Corrupt(f"{NAMES[tag]} of directory {index} ({nbytes} bytes at {at}) lies beyond the end "
                               f"of the {self.size}-byte file")
            return typ, count, b""
        return typ, count, self.read(at, nbytes, f"{NAMES[tag]} of directory {index}")

    def array(self, entries: dict, tag: int, index: int) -> np.ndarray:
        typ, _, data = self.raw(entries, tag, index)
        values = np.frombuffer(data, self.layout.dtypes[typ])
        if values.dtype.kind == "i" and values.min() < 0:
            raise _Corrupt(f"{NAMES[tag]} of directory {index} has negative values")
        return values

    def scalar(self, entries: dict, tag: int, index: int, default: int | None = None) -> int:
        """A tag's first value (``default`` when absent; absent without a default is corrupt)."""
        entry = entries.get(tag)
        if entry is None:
            if default is None:
                raise _Corrupt(f"directory {index} has no {NAMES[tag]}")
            return default
        typ, _, data = self.raw(entries, tag, index)
        value = int.from_bytes(data[: TYPE_SIZES[typ]], self.byteorder, signed=INTEGERS[typ][0] == "i")
        if value < 0:
            raise _Corrupt(f"{NAMES[tag]} of directory {index} is negative")
        return value

    def check_image(self, entries: dict, index: int) -> None:
        scalar, get, byteorder = self.scalar, entries.get, self.byteorder

        def value(tag: int, default: int | None = None) -> int:
            entry = get(tag)
            if entry is not None and entry[2] == 1 and entry[1] in UNSIGNED_SIZES:  # the usual: one value, inline
                return int.from_bytes(entry[3][: UNSIGNED_SIZES[entry[1]]], byteorder)
            return scalar(entries, tag, index, default)  # absent, odd types, several values: checked

        width, height = value(IMAGE_WIDTH), value(IMAGE_LENGTH)
        if width == 0 or height == 0:
            raise _Corrupt(f"directory {index} is {width} x {height} px")
        samples = value(SAMPLES_PER_PIXEL, 1)
        if not 1 <= samples <= 16:
            raise _Corrupt(f"directory {index} has {samples} samples per pixel")
        planar = value(PLANAR_CONFIG, 1)
        if planar not in (1, 2):
            raise _Corrupt(f"directory {index} has planar configuration {planar}")
        planes = samples if planar == 2 else 1
        if TILE_WIDTH in entries or TILE_LENGTH in entries or TILE_OFFSETS in entries:
            tw, th = value(TILE_WIDTH), value(TILE_LENGTH)
            if not (1 <= tw <= MAX_TILE_SIDE and 1 <= th <= MAX_TILE_SIDE and tw * th <= MAX_TILE_PIXELS):
                raise _Corrupt(f"directory {index} has {tw} x {th} px tiles (at most {MAX_TILE_SIDE} px a side "
                               f"and {MAX_TILE_PIXELS} px a tile)")
            self.add_table(entries, TILE_OFFSETS, TILE_BYTE_COUNTS, -(-width // tw) * -(-height // th) * planes,
                           index, "tile")
        else:
            rows = min(value(ROWS_PER_STRIP, height) or height, height)
            self.add_table(entries, STRIP_OFFSETS, STRIP_BYTE_COUNTS, -(-height // rows) * planes, index, "strip")

    def add_table(self, entries: dict, offsets_tag: int, counts_tag: int, blocks: int, index: int, kind: str) -> None:
        """Every tile (or strip) the image needs has an offset and a byte count, and no byte count
        exceeds the file: OpenSlide allocates a tile's byte count before reading it, while an
        offset past the end only fails that tile's read. Long tables are checked with numpy at
        the end, by ``check_tables``."""
        offsets, counts = entries.get(offsets_tag), entries.get(counts_tag)
        if offsets is None or (counts is None and kind == "tile"):  # libtiff estimates missing strip sizes
            raise _Corrupt(f"directory {index} has no {NAMES[offsets_tag if offsets is None else counts_tag]}")
        for entry in (offsets, counts):
            if entry is not None and entry[2] < blocks:
                raise _Corrupt(f"{NAMES[entry[0]]} of directory {index} lists {entry[2]} {kind}s, "
                               f"the image needs {blocks}")
        self.raw(entries, offsets_tag, index, read=False)  # its type, and that it lies in the file
        if counts is None:
            return
        typ, _, data = self.raw(entries, counts_tag, index)
        if blocks <= SHORT_TABLE:
            values = struct.unpack_from(f"{self.order}{blocks}{STRUCT_CODES[typ]}", data)
            if max(values) > self.size or min(values) < 0:
                self.report(index, kind, values)
        else:
            self.tables.append((index, kind, typ, data[: blocks * TYPE_SIZES[typ]]))

    def check_tables(self) -> None:
        """No byte count in the long tables exceeds the file size (or is negative)."""
        dtypes = self.layout.dtypes
        for index, kind, typ, data in self.tables:
            counts = np.frombuffer(data, dtypes[typ])
            if counts.max() > self.size or (typ in SIGNED and counts.min() < 0):
                self.report(index, kind, counts)

    def report(self, index: int, kind: str, counts) -> None:
        """Raise for the first byte count of the table that exceeds the file or is negative."""
        for block, count in enumerate(counts):
            if not 0 <= count <= self.size:
                raise _Corrupt(f"{kind} {block} of directory {index} has {int(count)} bytes, "
                               f"more than the whole {self.size}-byte file")
