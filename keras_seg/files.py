"""Writing files so that a reader never sees half of one (temporary name, then rename), and reading their checksums."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile

import numpy as np


def publish(temp_path: str, final_path: str):
    """Rename a finished temporary file to its final name, with the permissions of a normal new
    file (mkstemp creates files readable by their owner only)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_path, 0o666 & ~umask)
    os.replace(temp_path, final_path)


def temp_path_beside(path: str, suffix: str = ".partial") -> str:
    """A new, empty temporary file in `path`'s directory (same file system: rename is atomic)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=directory)
    os.close(fd)
    return tmp


def jsonable(value):
    """`value` with numpy arrays and scalars as Python values and NaN / inf as None, so that the
    JSON is valid (Python's json writes NaN, which jq and browsers reject)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def to_json(value) -> str:
    """Indented, valid JSON (NaN as null), with lists of numbers (colours, counts) kept on one line."""
    text = json.dumps(jsonable(value), indent=2, allow_nan=False)
    return re.sub(r"\[\s*([-\d.,\s]*?)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m[1]) + "]", text) + "\n"


def write_text_atomically(path: str, text: str):
    tmp = temp_path_beside(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomically(path: str, value):
    write_text_atomically(path, to_json(value))


def copy_atomically(source: str, path: str):
    """A copy of `source`'s bytes at `path`, published whole (a failed copy leaves `path` as it was)."""
    tmp = temp_path_beside(path)
    try:
        shutil.copyfile(source, tmp)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path) -> str:
    """The SHA-256 of a file's bytes, read in blocks (hashlib.file_digest needs Python 3.11)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
