"""The feature store: one HDF5 file per slide and encoder, in the layout TRIDENT and CLAM use.

    <root>/features_<encoder>/<slide>.h5
        features   (N, D) float16 or float32
        coords     (N, 2) int64, level-0 (x, y) of each patch's top-left corner
        skipped_coords (M, 2) int64, patches that could not be read (napari-mil only)
        attrs (file and ``features``): encoder, weights_hash, dim, cache_key, name
        attrs (``coords``): the patch geometry (``PatchGeometry.to_attrs``: TRIDENT's names and ours)

TRIDENT writes the same two datasets (its ``coords`` carry the patch attrs); CLAM's
``h5_files/<slide>.h5`` has them without attrs. ``FeatureBag.load`` reads all three, deriving the
geometry they leave out (``PatchGeometry.from_attrs``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from napari_mil._h5 import plain_attr
from napari_mil.atomic import atomic_path
from napari_mil.errors import FeatureStoreError, GridError
from napari_mil.geometry import PatchGeometry
from napari_mil.names import check_name


class FeatureBag:
    """A slide's patch features, their level-0 coordinates and the patches' geometry.

    ``attrs`` hold what the file says besides (encoder, weights_hash, cache_key, the slide's name);
    ``geometry`` is given, or read from the attrs and coordinates when first asked for.
    """

    def __init__(self, features: np.ndarray, coords: np.ndarray, attrs: dict | None = None,
                 skipped_coords: np.ndarray | None = None, geometry: PatchGeometry | None = None):
        self.features = features  # (N, D)
        self.coords = coords  # (N, 2) int64, level-0 (x, y)
        self.attrs = {} if attrs is None else attrs
        self.skipped_coords = np.zeros((0, 2), np.int64) if skipped_coords is None else skipped_coords
        self._geometry = geometry

    def __repr__(self) -> str:
        return f"FeatureBag({len(self)} patches, {self.features.shape[-1]}-d {self.encoder} features)"

    @property
    def geometry(self) -> PatchGeometry:
        """The patches' geometry; for a bag made without one, from its attrs (napari-mil's and
        TRIDENT's files) or its coordinates' spacing (CLAM's). GridError when they cannot tell
        (an empty bag, a single patch without attrs)."""
        if self._geometry is None:
            self._geometry = PatchGeometry.from_attrs(self.attrs, self.coords)
        return self._geometry

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def encoder(self) -> str:
        return str(self.attrs.get("encoder", "unknown"))

    def nonfinite_patches(self) -> int:
        """How many patches have a NaN or infinite feature (they cannot be scored)."""
        return int((~np.isfinite(self.features)).reshape(len(self), -1).any(axis=1).sum())

    def require_dim(self, expected: int, what: str = "the model") -> None:
        """Raise a clear error when the features do not have the dimension ``what`` expects."""
        if self.dim != expected:
            raise FeatureStoreError(
                f"features have {self.dim} dimensions (encoder {self.encoder}) but {what} expects {expected}: "
                "extract features with the encoder the model was trained on"
            )

    def widened(self) -> FeatureBag:
        """The bag with float32 features (itself when they are): for a bag that models will run on
        many times, as the viewer's open slide (every inference, comparison and training epoch),
        float16 features from the store are widened once instead of at every run, by torch, which
        is several times faster at it than numpy (docs/benchmarks.md)."""
        if self.features.dtype == np.float32:
            return self
        from napari_mil.models.contract import bag_tensor

        return FeatureBag(bag_tensor(self.features)[0].numpy(), self.coords, self.attrs, self.skipped_coords,
                          self._geometry)

    def save(self, path: str | os.PathLike, dtype=np.float32) -> Path:
        """Write atomically: a temporary file in the same folder renamed into place. The geometry
        goes on ``coords`` (where TRIDENT puts it), the other attrs on the file and ``features``;
        a bag whose geometry nothing tells (an empty one) is written without."""
        import h5py

        path = Path(path)
        try:
            geometry = self.geometry
        except GridError:
            geometry = None
        geometry_attrs = geometry.to_attrs() if geometry is not None else {}
        try:
            with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
                feats = fh.create_dataset("features", data=np.asarray(self.features, dtype=dtype))
                coords = fh.create_dataset("coords", data=np.asarray(self.coords, dtype=np.int64).reshape(-1, 2))
                fh.create_dataset("skipped_coords", data=np.asarray(self.skipped_coords, np.int64).reshape(-1, 2))
                for key, value in self.attrs.items():
                    if key not in geometry_attrs:  # the typed geometry is the one written
                        fh.attrs[key] = feats.attrs[key] = _attr(value)
                coords.attrs.update(geometry_attrs)
                if "name" in self.attrs:  # TRIDENT's slide name
                    coords.attrs["name"] = _attr(self.attrs["name"])
        except OSError as exc:
            raise _disk_error(exc, path) from None
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureBag:
        """Read a bag written by napari-mil, TRIDENT or CLAM; its geometry comes from the attrs
        of ``coords`` (and, in older napari-mil files, of the file), else the coordinates."""
        import h5py

        path = Path(path)
        if not path.exists():
            raise FeatureStoreError(f"feature file {path} does not exist")
        try:
            with h5py.File(path, "r") as fh:
                if "features" not in fh or "coords" not in fh:
                    raise FeatureStoreError(f"{path.name} is not a feature file: it needs 'features' and 'coords' datasets")
                features = np.asarray(fh["features"][:])
                coords = np.asarray(fh["coords"][:], np.int64)
                attrs = _file_attrs(fh)
                skipped = np.asarray(fh["skipped_coords"][:], np.int64) if "skipped_coords" in fh else np.zeros((0, 2), np.int64)
        except OSError as exc:
            raise FeatureStoreError(f"cannot read {path.name}: {exc}") from None
        if not (np.issubdtype(features.dtype, np.floating) or np.issubdtype(features.dtype, np.integer)):
            raise FeatureStoreError(f"{path.name}: features are stored as {features.dtype}, not numbers: "
                                    "extract them again")
        if features.ndim == 3 and features.shape[0] == 1:  # some pipelines keep a batch axis
            features = features[0]
        coords = coords.reshape(-1, 2)
        if features.ndim != 2 or len(features) != len(coords):
            raise FeatureStoreError(f"{path.name}: features {features.shape} do not match coords {coords.shape}")
        return cls(features, coords, attrs, skipped)


def stored_geometry(path: str | os.PathLike) -> tuple[PatchGeometry, dict]:
    """A feature file's patch geometry and attrs, without reading its features."""
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            if "features" not in fh or "coords" not in fh:
                raise FeatureStoreError(f"{path.name} is not a feature file: it needs 'features' and 'coords' datasets")
            coords = np.asarray(fh["coords"][:], np.int64).reshape(-1, 2)
            attrs = _file_attrs(fh)
    except OSError as exc:
        raise FeatureStoreError(f"cannot read {path.name}: {exc}") from None
    return PatchGeometry.from_attrs(attrs, coords), attrs


def _file_attrs(fh) -> dict:
    """The attrs of ``coords``, then of ``features``, then of the file (later ones win)."""
    attrs = {k: plain_attr(v) for k, v in fh["coords"].attrs.items()}
    attrs.update({k: plain_attr(v) for k, v in fh["features"].attrs.items()})
    attrs.update({k: plain_attr(v) for k, v in fh.attrs.items()})
    return attrs


def feature_path(root: str | os.PathLike, encoder: str, slide_name: str) -> Path:
    """Where a slide's features for an encoder live (TRIDENT's folder naming); a slide name
    that would reach outside the folder is an UnsafeNameError."""
    safe = encoder.replace("/", "_").replace("\\", "_").replace(":", "_")
    return Path(root) / f"features_{safe}" / f"{check_name(slide_name, 'slide name')}.h5"


def slide_identity(path: str | os.PathLike) -> str:
    """Cheap identity of a slide file: name, size and hashes of its first and last 64 KiB."""
    path = Path(path)
    digest = hashlib.sha256()
    size = path.stat().st_size if path.is_file() else 0
    digest.update(f"{path.name}:{size}".encode())
    if path.is_file():
        with open(path, "rb") as fh:
            digest.update(fh.read(65536))
            fh.seek(max(0, size - 65536))
            digest.update(fh.read(65536))
    return digest.hexdigest()[:16]


def encoder_signature(encoder) -> str:
    """The encoder's identity for caching: name, weights and the preprocessing it applies."""
    transform = repr(encoder.transform)
    if " at 0x" in transform:  # a default repr names a memory address, not the transform
        transform = type(encoder.transform).__qualname__
    return f"{encoder.name}|{encoder.weights_hash}|{encoder.input_size}|{transform}"


def cache_key(slide_path, grid, encoder, dtype: str) -> str:
    """What makes a feature file reusable: the slide, the grid (its patches and their whole
    geometry: sizes, step, overlap, resolutions, the level read), the encoder (name, weights,
    preprocessing) and the on-disk precision."""
    digest = hashlib.sha256()
    digest.update(slide_identity(slide_path).encode())
    digest.update(np.ascontiguousarray(grid.coords, np.int64).tobytes())
    geometry = {**grid.geometry.to_attrs(), "patch_size_level": grid.patch_size_level}
    digest.update(json.dumps([sorted(geometry.items()), encoder_signature(encoder), dtype]).encode())
    return digest.hexdigest()[:24]


def cached_bag(path: Path, key: str) -> FeatureBag | None:
    """The stored bag when it exists and was made from the same inputs, else None."""
    if not path.exists():
        return None
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            if plain_attr(fh.attrs.get("cache_key", "")) != key:
                return None
    except OSError:
        return None
    return FeatureBag.load(path)


def _disk_error(exc: OSError, path: Path) -> FeatureStoreError | OSError:
    if getattr(exc, "errno", None) == 28 or "No space left" in str(exc):
        return FeatureStoreError(
            f"the disk is full while writing {path.name}; finished chunks are kept, free some space and run "
            "again to resume"
        )
    return exc


def _attr(value):
    if value is None:
        return "None"
    if isinstance(value, (dict, list, tuple)) and not (isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value)):
        return json.dumps(value)
    return value


