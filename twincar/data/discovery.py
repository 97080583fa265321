"""Image discovery without decoding (and without torch): the files ``--images`` names, from files, folders and
glob patterns. :mod:`twincar.data.images` re-exports it; the torch-free ONNX predictor
(:mod:`twincar.inference.predictor`) uses it.
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from twincar.errors import TwinCarError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # what a folder scan collects


class NoImagesError(TwinCarError, FileNotFoundError):
    """``--images`` matched no image file."""


def _walk_files(top: Path, pattern: Sequence[str] | None = None) -> list[Path]:
    """Files under folder ``top`` (as spelled: ``top/sub/file``), sorted, never through a folder symlink
    (no loops, no file met twice). ``pattern``: the path parts below ``top`` to match, as :mod:`glob` does
    (``**`` is any number of folders, ``*`` and ``?`` do not match a leading dot); None: every file."""
    def unreadable(e: OSError) -> None:
        log.warning("cannot list folder %s: %s (skipped)", e.filename, e.strerror or e)

    depth = None if pattern is None or "**" in pattern else len(pattern) - 1  # deepest folder a match can be in
    found = []
    for folder, subfolders, files in os.walk(top, onerror=unreadable):  # followlinks=False
        rel = Path(folder).relative_to(top).parts
        if depth is not None and len(rel) >= depth:
            subfolders.clear()
        found += [Path(folder, f) for f in files if pattern is None or _glob_match((*rel, f), tuple(pattern))]
    return sorted(p for p in found if p.is_file())


def _glob_match(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path ``parts`` match glob ``pattern`` parts (``**``: zero or more folders, hidden ones not)."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_glob_match(parts[i:], pattern[1:]) for i in range(len(parts) + 1)
                   if not any(p.startswith(".") for p in parts[:i]))
    hidden = parts[:1] and parts[0].startswith(".") and not pattern[0].startswith(".")
    return bool(parts) and not hidden and fnmatch.fnmatch(parts[0], pattern[0]) and _glob_match(parts[1:], pattern[1:])


def _not_found(spec: str | Path, path: Path) -> str:
    """Why ``--images spec`` names nothing: missing, a symlink loop, a broken symlink, no permission."""
    try:
        path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"--images {spec}: a symlink loop ({path} links back to itself): pass image files, folders or globs"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"--images {spec}: permission denied"
        if path.is_symlink():
            return f"--images {spec}: a broken symlink (to {os.readlink(path)}, which does not exist)"
    return (f"--images {spec}: no such file or folder ({path.name} does not exist: "
            "pass image files, folders or glob patterns)")


def find_images(specs: Sequence[str | Path]) -> list[Path]:
    """Files named by ``specs``: folders (recursive, image extensions, sorted), files, or glob patterns
    (``**`` recurses). Folder symlinks are not followed in a scan (no loops).

    A file given by name is kept whatever its extension (so a broken upload gets its own error row), a file
    symlink too. The same file reached twice (two spellings, a link) is kept once: the first, as spelled.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found += [p for p in _walk_files(path) if p.suffix.lower() in IMAGE_EXTENSIONS]
        elif path.is_file():
            found.append(path)
        elif any(c in str(spec) for c in "*?["):  # a glob pattern: walked from its first folder without magic
            parts = path.parts
            first = next(i for i, part in enumerate(parts) if any(c in part for c in "*?["))
            top = Path(*parts[:first]) if first else Path(".")
            if top.is_dir():
                found += [p for p in _walk_files(top, parts[first:]) if p.suffix.lower() in IMAGE_EXTENSIONS]
        else:
            raise NoImagesError(_not_found(spec, path))
    unique, seen = [], set()
    for p in found:  # by resolved path: the first occurrence wins, as spelled
        if (key := os.path.realpath(p)) not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        listed = " ".join(map(str, specs))
        raise NoImagesError(f"--images {listed}: no image files found ({', '.join(IMAGE_EXTENSIONS)})")
    return unique
