"""Workdir and data paths, local or in a bucket (`gs://`, `s3://`, ...), through `etils.epath` (what Orbax and
TFDS use). Without TensorFlow, epath reaches buckets through fsspec (`gcsfs` for `gs://`); local paths are plain
`pathlib` paths.

A local path is made absolute (relative to the working directory when the run starts) so messages name the
file a user can open; a bucket path is kept as written.
"""
from __future__ import annotations

import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` names an object store (`scheme://...`) rather than the local file system."""
  return '://' in os.fspath(path)


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a local one with `~` expanded and made absolute, a bucket one unchanged."""
  if is_remote(path):
    return epath.Path(os.fspath(path))
  return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def join(path: PathLike, *parts: str) -> str:
  """`path/part/...` as a string (`gs://b/run` + `results.json` -> `gs://b/run/results.json`)."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*parts))


def atomic_write(path: PathLike, data: Union[str, bytes]) -> None:
  """Replaces the file at `path` by `data` so that a reader never sees a partial file: locally, writes a
  temporary file next to it and renames it over the old one; in a bucket, one object upload (an object store
  makes an upload visible only once it is complete). Creates the parent directory."""
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  mode = 'wb' if isinstance(data, bytes) else 'w'
  if is_remote(path):
    with path.open(mode) as f:
      f.write(data)
    return
  tmp = path.parent / (path.name + '.tmp')
  with tmp.open(mode) as f:
    f.write(data)
  tmp.replace(path)


def open_file(path: PathLike, mode: str = 'r', **kwargs):
  """`open(path, mode)` for a local file, `epath.Path(path).open(mode)` for a bucket object."""
  return as_path(path).open(mode, **kwargs) if is_remote(path) else open(path, mode, **kwargs)


def is_file(path: PathLike) -> bool:
  """Whether `path` is a file (local: `os.path.isfile`, cheap enough per image of a million-line split list)."""
  return as_path(path).is_file() if is_remote(path) else os.path.isfile(path)


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir() if is_remote(path) else os.path.isdir(path)
