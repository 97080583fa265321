"""Files TwinCar writes: always atomically in their final folder, JSON always strict.

Every writer here puts the bytes in a temporary file beside the target (same folder, so the same
filesystem), flushes and fsyncs it, then renames it over the target: a reader, a crash or a kill sees
the old file or the new one, never half of one. On failure the temporary file is removed. The new file
gets the mode the umask gives (as ``open`` would), not ``mkstemp``'s 0600.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)


class ReadError(TwinCarError, ValueError):
    """A file TwinCar reads back (a model card, a config) is not what it should be; the message names it."""


class WriteError(TwinCarError, OSError):
    """A file could not be written (full disk, no permission, a folder in the way); the old one is intact."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for a writer that wants a file name (``torch.save``,
    ``safetensors``, ``onnx``); on success it is fsynced and renamed to ``path``, on failure removed.

    An ``OSError`` (a full disk, permission denied) becomes a :class:`WriteError` naming ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise WriteError(f"cannot write {path}: {e.strerror or e}") from e
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, TwinCarError):
            raise WriteError(f"cannot write {path}: {e.strerror or e} (the previous file, if any, is unchanged)") from e
        raise


def temp_files(directory: str | Path) -> list[Path]:
    """The temporary files :func:`atomic_path` leaves in ``directory`` when its process is killed mid-write
    (``.<name>.<random>.tmp``)."""
    directory = Path(directory)
    return sorted(p for p in directory.glob(".*.tmp") if p.is_file()) if directory.is_dir() else []


def remove_stale_temp_files(*directories: str | Path) -> list[Path]:
    """Remove (and log) the temporary files a killed writer left in ``directories``; call it only where no
    other process writes (e.g. holding the run directory's lock). Returns what was removed."""
    removed = []
    for path in (p for d in directories for p in temp_files(d)):
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError as e:
            log.warning("could not remove the stale temporary file %s: %s", path, e.strerror or e)
            continue
        log.info("removed %s (%d bytes), left by an interrupted write", path, size)
        removed.append(path)
    return removed


def write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8, newlines as given) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"))


def strict(value: object) -> object:
    """``value`` with every NaN and infinity replaced by None, so that it is strict JSON (browsers, JS clients)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def dumps(value: object, indent: int | None = 1) -> str:
    """Strict JSON text of ``value``: NaN and infinity are written as ``null``."""
    return json.dumps(strict(value), indent=indent, allow_nan=False, ensure_ascii=False)


def write_json(path: str | Path, value: object) -> Path:
    """Write ``value`` as strict JSON to ``path`` atomically."""
    return write_text(path, dumps(value) + "\n")


def write_csv(path: str | Path, rows: Iterable[dict], fields: Sequence[str]) -> Path:
    """Write ``rows`` (dicts keyed by ``fields``, in that column order) as CSV to ``path`` atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text(path, buf.getvalue())


def check_writable(path: str | Path, option: str) -> Path:
    """Before any work: ``path`` can be written as a file (it is not a folder, no file stands where a folder of
    it should be, and its nearest existing folder is writable). A :class:`WriteError` names ``option``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WriteError(f"{_named(option, path)} is a folder: pass a file path, e.g. {path / 'predictions.csv'}")
    check_writable_dir(path.parent, option, shown=path)
    if path.exists() and not os.access(path, os.W_OK):
        raise WriteError(f"{_named(option, path)}: permission denied (the file is read-only)")
    return path


def check_writable_dir(directory: str | Path, option: str, *, shown: Path | None = None) -> Path:
    """Before any work: ``directory`` is, or can be created as, a writable folder. A :class:`WriteError` names
    ``option`` and ``shown`` (default: the folder)."""
    directory = Path(directory).expanduser()
    shown = _named(option, shown or directory)
    existing = directory
    while not existing.exists():
        if existing.is_symlink():  # a dangling link where a folder should be
            raise WriteError(f"{shown}: {existing} is a broken link")
        existing = existing.parent
    if not existing.is_dir():
        raise WriteError(f"{shown}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise WriteError(f"{shown}: permission denied on the folder {existing}")
    return directory


def _named(option: str, path: Path) -> str:
    """How an option and its value read in a message: ``--output x.csv`` or ``out=DIR`` (a config key)."""
    return f"{option} {path}" if option.startswith("-") else f"{option}={path}"


def read_json_object(path: str | Path, holds: str) -> dict:
    """The JSON object in ``path`` (a model card, a hub config); a :class:`ReadError` in one sentence when it is
    not valid JSON or not an object (``holds``: what it should hold, for the message)."""
    try:
        value = json.loads(Path(path).read_text("utf-8"))
    except ValueError as e:
        raise ReadError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ReadError(f"{path} must hold a JSON object ({holds})")
    return value
