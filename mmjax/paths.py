"""Paths: local folders and buckets (`gs://`, `s3://`) alike, through etils.epath."""

from __future__ import annotations

import os
import uuid

from etils import epath


def resolve(p) -> epath.Path:
    """`p` as an epath.Path: `~` expanded and made absolute when local; a bucket URL as it is
    (os.path.abspath would turn `gs://b/run` into `<cwd>/gs:/b/run`)."""
    p = epath.Path(p).expanduser()
    return p if "://" in str(p) else p.absolute()


def is_local(path) -> bool:
    """False for object-store paths (gs://, s3://, ...): no append, no atomic rename."""
    return "://" not in os.fspath(path)


def write_atomic(path, data: bytes | str) -> None:
    """Writes a whole file: locally via a temporary sibling + replace, remotely in one upload."""
    path = epath.Path(path)
    data = data.encode() if isinstance(data, str) else data
    if not is_local(path):
        path.write_bytes(data)  # one object upload: readers see the old or the new object
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    finally:
        if tmp.exists():
            tmp.unlink()
