"""The on-disk cache for generated data: one ``.npy`` array plus a JSON manifest holding its checksum.

The array is written first and the manifest last, both atomically, so a cache
entry counts as present only once it is complete; a later mismatch between the
array's bytes and the manifest's SHA-256 marks it corrupt.

Example::

    from mtl_plugin.data.cache import data_home, load_verified_array, save_verified_array
    path = data_home() / "kanji" / "demo.npy"
    save_verified_array(path, np.zeros((2, 28, 28), np.uint8), {"seed": 0})
    pixels, manifest, problem = load_verified_array(path, {"seed": 0})
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from mtl_plugin.errors import DataError
from mtl_plugin.utils.io import atomic_write_bytes, atomic_write_text

__all__ = ["data_home", "manifest_path", "save_verified_array", "load_verified_array"]

ENVIRONMENT_VARIABLE = "MTL_DATA"


def data_home() -> Path:
    """The cache folder: ``$MTL_DATA`` if set, else ``$XDG_CACHE_HOME/mtl_plugin``
    (``~/.cache/mtl_plugin`` when ``XDG_CACHE_HOME`` is unset).

    Raises:
        DataError: ``$MTL_DATA`` names a file.

    Example::

        cache = data_home() / "kanji"
    """
    configured = os.environ.get(ENVIRONMENT_VARIABLE)
    if configured:
        path = Path(configured).expanduser()
        if path.exists() and not path.is_dir():
            raise DataError(
                f"{ENVIRONMENT_VARIABLE}={configured} is a file, not a folder: point it to a folder "
                f"(it is created if missing), or unset it to use ~/.cache/mtl_plugin"
            )
        return path
    # The XDG base-directory spec: an empty or relative value is to be ignored.
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "mtl_plugin"


def manifest_path(array_path: Path) -> Path:
    """Where the manifest of ``array_path`` lives (same name, ``.json``)."""
    return Path(array_path).with_suffix(".json")


def save_verified_array(path: os.PathLike, array: np.ndarray, metadata: dict) -> dict:
    """Write ``array`` to ``path`` (``.npy``) and its manifest; return the manifest.

    Example::

        save_verified_array("cache/x.npy", pixels, {"generator": 1})
    """
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    payload = buffer.getvalue()
    manifest = dict(
        metadata,
        sha256=hashlib.sha256(payload).hexdigest(),
        shape=list(array.shape),
        dtype=str(array.dtype),
    )
    atomic_write_bytes(path, payload)
    atomic_write_text(manifest_path(Path(path)), json.dumps(manifest, indent=1, sort_keys=True))
    return manifest


def load_verified_array(path: os.PathLike, metadata: dict) -> tuple[np.ndarray | None, dict | None, str]:
    """Load a cached array if it is complete, matches ``metadata`` and its checksum.

    Returns ``(array, manifest, "")`` on success, else ``(None, None, why)``.

    Example::

        pixels, manifest, problem = load_verified_array("cache/x.npy", {"generator": 1})
        if pixels is None:
            print("rebuilding:", problem)
    """
    path = Path(path)
    try:
        manifest = json.loads(manifest_path(path).read_text(encoding="utf-8"))
        payload = path.read_bytes()
    except FileNotFoundError:
        return None, None, "not generated yet"
    except (OSError, ValueError) as error:
        return None, None, f"unreadable cache entry ({error})"
    if not isinstance(manifest, dict):
        return None, None, "manifest is not a JSON object"
    # Round-trip through JSON so that tuples compare equal to the lists read back.
    for key, value in json.loads(json.dumps(metadata)).items():
        if manifest.get(key) != value:
            return None, None, f"manifest field {key!r} is {manifest.get(key)!r}, expected {value!r}"
    if hashlib.sha256(payload).hexdigest() != manifest.get("sha256"):
        return None, None, "checksum mismatch (corrupt or partly written file)"
    try:
        array = np.load(io.BytesIO(payload), allow_pickle=False)
    except ValueError as error:
        return None, None, f"unreadable array ({error})"
    if list(array.shape) != manifest.get("shape") or str(array.dtype) != manifest.get("dtype"):
        return None, None, "array shape or dtype differs from the manifest"
    return array, manifest, ""
