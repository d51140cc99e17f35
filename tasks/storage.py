"""Checkpoint locations: a local path, or a URI that pyarrow can read (``s3://``, ``gs://``, ``hdfs://``).

Ray Train writes checkpoints under ``storage_path`` (a local/shared folder or a cloud URI); the work
units read them through :func:`local_copy`, so evaluation runs wherever a Ray task is scheduled.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.gettempdir()) / "sors-checkpoints"


def is_remote(uri: str) -> bool:
    """True for URIs with a scheme other than ``file``."""
    return "://" in uri and not uri.startswith("file://")


def checkpoint_exists(uri: str) -> bool:
    """True when ``uri`` names a checkpoint that can be read: a local file that exists, or any remote URI
    (not probed: reading it is what tells)."""
    return bool(uri) and (is_remote(uri) or local_copy(uri).is_file())


def local_copy(uri: str) -> Path:
    """A local path holding the file at ``uri`` (the path itself when it is local).

    Remote files are downloaded once per machine into a cache keyed by the URI.
    """
    if not is_remote(uri):
        return Path(uri[len("file://") :] if uri.startswith("file://") else uri)
    from pyarrow import fs  # pyarrow comes with Ray; imported lazily so local use does not need it

    target = _CACHE / hashlib.sha256(uri.encode()).hexdigest()[:24] / Path(uri).name
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        filesystem, path = fs.FileSystem.from_uri(uri)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        with filesystem.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(tmp, target)
    return target


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (content address of a checkpoint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
