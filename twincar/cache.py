"""``python -m twincar.cache [overrides]`` (``twincar-cache``): build the pre-resized image cache of the data config
a training run with these overrides gets (:mod:`twincar.data.cache`)."""

from __future__ import annotations

import logging
import sys

from twincar.data.cache import DATA
from twincar.data.cache import __doc__ as LIBRARY_DOC
from twincar.data.pipeline import READS_CACHE, refuse_removed_overrides
from twincar.errors import TwinCarError


def main(argv: list[str] | None = None) -> int:
    """``python -m twincar.cache [overrides]``: build the cache of the data config composed from the
    train config with these overrides (the same ones a training run gets)."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(LIBRARY_DOC)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        refuse_removed_overrides(argv)
        with initialize_config_module("twincar.conf", version_base="1.3"):
            cfg = compose("train", overrides=[*argv, "data.skipped_file=null"])  # no run dir here
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
