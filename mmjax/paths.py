"""Paths: local folders and buckets (`gs://`, `s3://`) alike, through etils.epath."""

from __future__ import annotations

from etils import epath


def resolve(p) -> epath.Path:
    """`p` as an epath.Path: `~` expanded and made absolute when local; a bucket URL as it is
    (os.path.abspath would turn `gs://b/run` into `<cwd>/gs:/b/run`)."""
    p = epath.Path(p).expanduser()
    return p if "://" in str(p) else p.absolute()
