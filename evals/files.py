"""Reading benchmark files: JSON, JSON lines (either may be gzipped) and the data shipped with vlmkit.

Every malformed file raises one :class:`DataError` naming the file and, for JSON lines, the line.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vlmkit.errors import DataError

DATA_DIR = Path(__file__).parent / "data"


def data_file(relative: str) -> Path:
    """The path of a file shipped in ``vlmkit/evals/data``."""
    return DATA_DIR / relative


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename, so that a crash (or another rank writing
    the same file) never leaves it half written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_text(path: str | Path) -> str:
    """The text of ``path`` (gunzipped when it ends in .gz)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        return raw.decode("utf-8-sig")
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({error}); is it the right file?") from None


def read_json(path: str | Path) -> Any:
    """Parse a whole JSON document."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """The records of a JSON-lines file or of a JSON array of objects, as ``(line, record)`` pairs.

    The format is detected from the first non-blank character (``[`` = array). Blank lines are skipped. For an
    array the line is the record's position (1-based).
    """
    text = read_text(path)
    if text.lstrip().startswith("["):
        records = read_json(path)
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON array of records")
        pairs = list(enumerate(records, start=1))
    else:
        pairs = list(_json_lines(path, text))
    for line, record in pairs:
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {line}: expected a JSON object, got {type(record).__name__}")
    return pairs


def _json_lines(path: str | Path, text: str) -> Iterator[tuple[int, Any]]:
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}: line {number}: not valid JSON ({error.msg}); fix or remove the line") from None


def checked(record: dict, key: str, kind: type | tuple[type, ...], where: str,
          check: Callable[[Any], bool] | None = None) -> Any:
    """``record[key]``, checked to be of type ``kind`` (bool is never accepted as int); ``where`` names the file
    and line in the error."""
    if key not in record:
        raise DataError(f"{where}: missing key {key!r}")
    value = record[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds) or (check and not check(value)):
        names = " or ".join(k.__name__ for k in kinds)
        raise DataError(f"{where}: {key!r} must be a valid {names}, got {value!r}")
    return value


def md5(path: str | Path) -> str:
    """The md5 of a file's content (of the gunzipped bytes for .gz, so it matches the md5 of the original file)."""
    path = Path(path)
    raw = path.read_bytes()
    return hashlib.md5(gzip.decompress(raw) if path.suffix == ".gz" else raw).hexdigest()


def coco_index(path: Path, data: dict | None = None):
    """A pycocotools ``COCO`` index of ``path`` (read with our reader, so errors name the file)."""
    from pycocotools.coco import COCO

    data = read_json(path) if data is None else data
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise DataError(f"{path}: not a COCO annotations file (no 'annotations' list)")
    coco = COCO()
    coco.dataset = data
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()
    except (KeyError, TypeError) as error:
        raise DataError(f"{path}: malformed COCO annotations ({type(error).__name__}: {error})") from None
    return coco
