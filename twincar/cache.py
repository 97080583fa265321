"""``python -m twincar.cache [overrides]`` (``twincar-cache``): build the pre-resized image cache of the data config
a training run with these overrides gets (:mod:`twincar.data.cache`).

``python -m twincar.cache pack out=DIR [short_side=N] [workers=N] [overrides]``: write that data config's train,
val and test images as LitData shards for ``data.pipeline=stream data.stream=DIR`` (:mod:`twincar.data.stream`)."""

from __future__ import annotations

import logging
import sys
import time

from twincar.data.cache import DATA
from twincar.data.cache import __doc__ as LIBRARY_DOC
from twincar.data.pipeline import READS_CACHE, refuse_removed_overrides
from twincar.errors import TwinCarError

PACK_OPTIONS = ("out", "short_side", "workers")


def _compose_data(overrides: list[str]):
    from hydra import compose, initialize_config_module

    refuse_removed_overrides(overrides)
    with initialize_config_module("twincar.conf", version_base="1.3"):
        return compose("train", overrides=[*overrides, "data.skipped_file=null"])  # no run dir here


def pack_main(argv: list[str]) -> int:
    """``pack out=DIR [short_side=N] [workers=N] [overrides]``: the data config's splits as LitData shards."""
    from hydra.utils import instantiate

    from twincar.data.stream import pack

    options = {k: v for k, _, v in (a.partition("=") for a in argv) if k in PACK_OPTIONS}
    overrides = [a for a in argv if a.partition("=")[0] not in PACK_OPTIONS]
    if not options.get("out"):
        print("error: pack needs out=DIR, the folder to write the shards to", file=sys.stderr)
        return 2
    try:
        short_side = int(options["short_side"]) if options.get("short_side") not in (None, "", "null") else None
        workers = int(options["workers"]) if options.get("workers") else None
    except ValueError:
        print("error: short_side and workers must be whole numbers", file=sys.stderr)
        return 2
    try:
        cfg = _compose_data(overrides)
        cfg.data.pipeline = "files"  # pack reads the dataset on disk
        dm = instantiate(cfg.data, _convert_="all")
        dm.prepare_data()
        dm.setup()
        start = time.perf_counter()
        splits = {"train": dm.train_set.samples, "val": dm.val_set.samples,
                  "test": dm.test_set.samples if dm.test_set is not None else []}
        out = pack(splits, options["out"], dm.class_names, dm.car_names, dm.split, short_side=short_side,
                   workers=workers)
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    total = sum(len(v) for v in splits.values())
    print(f"pack: {out} ({total} images: {', '.join(f'{len(v)} {k}' for k, v in splits.items())}; "
          f"{len(dm.class_names)} classes; {time.perf_counter() - start:.1f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m twincar.cache [overrides]``: build the cache of the data config composed from the
    train config with these overrides (the same ones a training run gets). ``pack ...``: see :func:`pack_main`."""
    from hydra.utils import instantiate

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        print(LIBRARY_DOC)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv[:1] == ["pack"]:
        return pack_main(argv[1:])
    try:
        cfg = _compose_data(argv)
        if cfg.data.pipeline not in READS_CACHE:
            cfg.data.pipeline = "cache"  # the copy gpu_cache reads too
        dm = instantiate(cfg.data, _convert_="all")
        dm.prepare_data()
    except TwinCarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cache = dm.image_cache
    size = (cache.directory / DATA).stat().st_size
    print(f"image cache: {cache.directory} ({len(cache)} images, {len(cache.errors)} unreadable, "
          f"short side {cache.short_side}, {cache.format}, {size / 2**20:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
