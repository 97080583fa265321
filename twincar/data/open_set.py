"""The open-set split of a labelled copy (``data.open_set.holdout``), as the Semantic Shift Benchmark (Vaze et al.,
ICLR 2022) builds one from Stanford Cars: some classes are held out, the model trains on the others (the known
classes, relabelled 0..K-1 in their original order), and the held-out classes' **test** images are the unknown
images an open-set evaluation must reject. Their training images are never used.

``holdout`` is either a number ``N`` (hold out ``N`` classes: the first ``N`` of a permutation of the labels drawn by
``numpy.random.default_rng(seed)``, so the same ``N`` and ``seed`` hold out the same classes of the same copy), or a
text file with one class per line: a class name (matched by :func:`twincar.data.classes.name_key`, case and spacing
ignored) or a 0-based label as in ``classes.txt``; blank lines and ``#`` comments are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from twincar.data.classes import name_key
from twincar.data.formats import UNLABELED, CarsData, DatasetFormatError, Sample

OPEN_SET_KEYS = ("holdout", "seed")


@dataclass
class OpenSetSplit:
    """A copy split into its known classes (``known``: only those, relabelled) and its held-out ones."""

    known: CarsData
    held_out: list[str]  # the held-out class names, in their original label order
    unknown: list[Sample]  # the held-out classes' test images; label = index in held_out


def _read_holdout_file(path: Path, class_names: list[str]) -> list[int]:
    """The labels a holdout file names (class names or 0-based labels, one a line)."""
    try:
        lines = path.read_text("utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetFormatError(f"data.open_set.holdout={path} cannot be read ({e}): pass a text file with one "
                                 "class name or 0-based label a line, or a number of classes") from e
    by_key = {name_key(n): i for i, n in enumerate(class_names)}
    labels = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isdigit():
            if int(entry) >= len(class_names):
                raise DatasetFormatError(f"{path}, line {number}: label {entry} is not a class of the data "
                                         f"(labels 0..{len(class_names) - 1})")
            labels.append(int(entry))
        elif name_key(entry) in by_key:
            labels.append(by_key[name_key(entry)])
        else:
            raise DatasetFormatError(f"{path}, line {number}: '{entry}' is not a class of the data (python -m "
                                     "twincar.data.classes lists its names)")
    if not labels:
        raise DatasetFormatError(f"{path} names no class to hold out")
    return sorted(set(labels))


def holdout_labels(holdout: int | str, class_names: list[str], seed: int = 0) -> list[int]:
    """The labels ``holdout`` holds out (sorted): ``N`` drawn by ``seed``, or those a file names. At least two
    classes must stay known."""
    k = len(class_names)
    if isinstance(holdout, str) and holdout.strip().isdigit():
        holdout = int(holdout)
    if isinstance(holdout, bool) or not isinstance(holdout, (int, str)):
        raise DatasetFormatError(f"data.open_set.holdout={holdout!r} must be a number of classes or a file of them")
    if isinstance(holdout, int):
        if not 1 <= holdout <= k - 2:
            raise DatasetFormatError(f"data.open_set.holdout={holdout} must be between 1 and {k - 2}: the data has "
                                     f"{k} classes and at least 2 must stay known")
        return sorted(np.random.default_rng(seed).permutation(k)[:holdout].tolist())
    path = Path(holdout).expanduser()
    if not path.is_file():
        raise DatasetFormatError(f"data.open_set.holdout={holdout}: no such file (pass a text file with one class "
                                 "name or 0-based label a line, or a number of classes)")
    labels = _read_holdout_file(path, class_names)
    if len(labels) > k - 2:
        raise DatasetFormatError(f"{path} holds out {len(labels)} of the {k} classes: at least 2 must stay known")
    return labels


def split_open_set(data: CarsData, held: list[int]) -> OpenSetSplit:
    """``data`` without the ``held`` labels (the rest relabelled 0..K-1 in order), and the held-out test images."""
    held_set = set(held)
    known = [i for i in range(len(data.class_names)) if i not in held_set]
    new_label = {old: new for new, old in enumerate(known)}
    unknown_label = {old: new for new, old in enumerate(sorted(held_set))}

    def relabel(samples: list[Sample], keep_unlabelled: bool) -> list[Sample]:
        return [replace(s, label=new_label[s.label]) if s.label in new_label else s for s in samples
                if s.label in new_label or (keep_unlabelled and s.label == UNLABELED)]

    known_data = CarsData(data.format, data.root, [data.class_names[i] for i in known],
                          relabel(data.train, False), relabel(data.test, True),
                          None if data.cars is None else [data.cars[i] for i in known], data.official_test)
    unknown = [replace(s, label=unknown_label[s.label]) for s in data.test if s.label in unknown_label]
    return OpenSetSplit(known_data.validate(), [data.class_names[i] for i in sorted(held_set)], unknown)


def check_open_set(open_set: dict | None) -> dict:
    """``data.open_set`` as a dict with only the known keys (``holdout``, ``seed``)."""
    open_set = dict(open_set or {})
    extra = sorted(set(open_set) - set(OPEN_SET_KEYS))
    if extra:
        raise DatasetFormatError(f"data.open_set has no option {', '.join(extra)}: its options are "
                                 f"{', '.join(OPEN_SET_KEYS)}")
    return {"holdout": open_set.get("holdout"), "seed": int(open_set.get("seed") or 0)}
