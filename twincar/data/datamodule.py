"""CarsDataModule: a Stanford Cars copy in any layout (real or synthetic) -> split, datasets, loaders."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from functools import partial
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from twincar.data import device as device_paths
from twincar.data.cache import ImageCache, open_cache
from twincar.data.check import find_unreadable
from twincar.data.classes import CarName
from twincar.data.datasets import CarsDataset, DeviceRefDataset, collate_readable
from twincar.data.device import DeviceCache, DeviceImages, ImageRefs, cache_ref, read_encoded
from twincar.data.formats import FORMATS, UNLABELED, CarsData, DatasetFormatError, Sample, dvm, load_dataset
from twincar.data.images import load_sample, sample_label
from twincar.data.open_set import OpenSetSplit, check_open_set, holdout_labels, split_open_set
from twincar.data.pipeline import READS_CACHE, REMOVED, check_pipeline, refuse_removed_flags
from twincar.data.preprocess import Preprocess
from twincar.data.sampling import eval_sampler, load_or_make_split, per_device_batch_size
from twincar.data.stream import Pack, StreamItem, is_url, open_split, split_samples, streaming_loader
from twincar.data.synthetic import SyntheticSpec, generate
from twincar.data.transforms import (
    Augmentation,
    BatchTransform,
    EvalImageTransform,
    TrainImageTransform,
    check_mix_batch,
    train_decode_min_side,
)
from twincar.errors import TwinCarError
from twincar.files import write_text

log = logging.getLogger(__name__)


ON_CORRUPT = ("fail", "skip")


class CarsDataModule(L.LightningDataModule):
    """A Stanford Cars copy in any layout (``format``): official train -> stratified train/val, official test.

    Before the splits are built, every image header is checked (:func:`twincar.data.check.find_unreadable`):
    ``on_corrupt="fail"`` stops with the list of bad files, ``"skip"`` leaves them out (named once in the
    log and in ``skipped_file``). ``crop_to_bbox`` crops every image to its car box (grown by
    ``bbox_margin`` of the box size per side) before the other transforms. With ``synthetic`` set, the
    embedded dataset for that spec is generated (once, cached) under ``root/<fingerprint>`` and read by the
    very same loader.

    ``pipeline`` is how images reach the model (:mod:`twincar.data.pipeline`): ``files``, ``cache`` (a
    pre-resized copy), ``gpu_decode`` or ``gpu_cache`` (:mod:`twincar.data.device`: per-image work on the
    training device). The flags it replaced are refused by name (:func:`twincar.data.pipeline.refuse_removed_flags`),
    any other unknown option by name too.

    ``open_set={"holdout": N | FILE, "seed": S}`` (:mod:`twincar.data.open_set`) holds classes out: the module then
    has only the known classes (``class_names``, labels 0..K-1), and ``open_set_samples`` are the held-out classes'
    test images (``held_out_names`` their classes), the unknown images of an open-set evaluation.
    """

    def __init__(
        self,
        *,
        root: str,
        image_size: int = 224,
        eval_crop_pct: float = 0.875,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        split_seed: int = 42,
        split_dir: str | None = None,
        augmentation: dict | None = None,
        synthetic: dict | None = None,
        format: str = "auto",
        crop_to_bbox: bool = False,
        bbox_margin: float = 0.1,
        on_corrupt: str = "fail",
        skipped_file: str | None = None,
        pipeline: str = "files",
        cache_dir: str | None = None,
        cache_format: str = "raw",
        stream: str | None = None,
        views: list[int] | None = None,
        open_set: dict | None = None,
        **unknown: object,
    ):
        refuse_removed_flags(unknown)
        unknown = {k: v for k, v in unknown.items() if k not in REMOVED}  # a removed flag's null: unset
        if unknown:
            raise DatasetFormatError(f"data.{next(iter(unknown))} is not an option of the data config "
                                     "(twincar.data.datamodule.CarsDataModule)")
        super().__init__()
        self.save_hyperparameters(logger=False)
        for option, value, least in (("batch_size", batch_size, 1), ("eval_batch_size", eval_batch_size, 1),
                                     ("num_workers", num_workers, 0), ("image_size", image_size, 1)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
                raise DatasetFormatError(f"data.{option}={value} must be a whole number of at least {least}")
        self.preprocess = Preprocess(image_size=image_size, eval_crop_pct=eval_crop_pct)
        self.aug = Augmentation.from_config(augmentation)
        if self.aug.mixes:
            check_mix_batch(batch_size)
        if format not in FORMATS:
            raise DatasetFormatError(f"data.format={format} is not one of {', '.join(FORMATS)}")
        if on_corrupt not in ON_CORRUPT:
            raise DatasetFormatError(f"data.on_corrupt={on_corrupt} is not one of {', '.join(ON_CORRUPT)}")
        if bbox_margin < 0:
            raise DatasetFormatError(f"data.bbox_margin={bbox_margin} must be >= 0 (a fraction of the box size)")
        self.pipeline = check_pipeline(pipeline, cache_format=cache_format, stream=stream)
        self.spec = SyntheticSpec(**synthetic) if synthetic is not None else None
        self.root = Path(root) / self.spec.fingerprint() if self.spec else Path(root)
        self.open_set = check_open_set(open_set)
        if self.pipeline == "stream" and self.open_set["holdout"] is not None:
            raise DatasetFormatError("data.open_set.holdout splits a dataset on disk: it is not available with "
                                     "data.pipeline=stream (the pack holds the split it was packed with)")
        self._open_set_split: OpenSetSplit | None = None  # with data.open_set.holdout: the held-out classes
        self.split: dict | None = None  # the train/val file names in use, saved next to the run
        self._data: CarsData | None = None
        self._pack: Pack | None = None  # data.pipeline=stream: the pack at data.stream
        self._test_names: list[str] | None = None  # the test split this module made (a dataset without one)
        self.skipped: list[str] = []  # images left out under on_corrupt=skip, as named to the user
        self.train_set = self.val_set = self.test_set = None
        self.train_batch_transform: BatchTransform | None = None
        self.eval_batch_transform = BatchTransform(self.preprocess)
        self.image_cache: ImageCache | None = None  # the pre-resized copy read by data.pipeline=cache|gpu_cache
        self.device_images: DeviceImages | None = None  # per-batch decode/crop/transform of the GPU input paths

    # -- data on disk -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the embedded dataset if this is a synthetic run, and build the image cache if the
        pipeline reads it (both no-ops when already on disk)."""
        if self.spec is not None:
            generate(self.root, self.spec)
        if self.pipeline in READS_CACHE:
            self._open_cache()

    def _open_cache(self) -> ImageCache:
        """The pre-resized copy of every train and test image (``data.pipeline=cache|gpu_cache``), built once."""
        if self.image_cache is None:
            hp = self.hparams
            samples = self.data.train + self.data.test
            self.image_cache = open_cache(samples, hp.cache_dir or self.root / "cache", self.preprocess,
                                          fmt=hp.cache_format, workers=max(1, hp.num_workers))
        return self.image_cache

    @property
    def data(self) -> CarsData:
        """The copy at ``root`` as read by its layout's reader (read once)."""
        if self._data is None and self.pipeline == "stream":  # the pack's classes; its images are in the shards
            pack = self.stream_pack
            self._data = CarsData("stream", Path(pack.location), pack.class_names, [], [], pack.cars)
        if self._data is None:
            data = load_dataset(self.root, self.hparams.format)
            log.info("%s: %s layout", data.root, data.format)
            if self.hparams.views is not None:
                if data.format != "dvm":
                    raise DatasetFormatError(f"data.views keeps DVM-CAR images of some viewpoints; the {data.format} "
                                             f"copy at {data.root} has no viewpoints: set data.views=null")
                data = dvm.keep_views(data, self.hparams.views)
            if not data.official_test:
                data = self._hold_out_test(data)
            if self.open_set["holdout"] is not None:
                held = holdout_labels(self.open_set["holdout"], data.class_names, self.open_set["seed"])
                split = self._open_set_split = split_open_set(data, held)
                data = split.known
                log.info("open set (data.open_set.holdout=%s): %d known classes, %d held out (%d test images): %s",
                         self.open_set["holdout"], len(data.class_names), len(held), len(split.unknown),
                         ", ".join(split.held_out))
            self._data = data
        return self._data

    def _hold_out_test(self, data: CarsData) -> CarsData:
        """A dataset with no test split (DVM-CAR, VMMRdb): ``data.test_fraction`` of each class held out as test,
        stratified, seeded by ``data.split_seed`` and persisted like the val split (:func:`load_or_make_split`)."""
        hp = self.hparams
        split = load_or_make_split(data.train, hp.test_fraction, hp.split_seed, hp.split_dir)
        index = {s.name: s for s in data.train}
        self._test_names = split["val"]
        log.info("%s has no test split: %d of %d images held out as test (data.test_fraction=%g, seed %d)",
                 data.root, len(split["val"]), len(data.train), hp.test_fraction, hp.split_seed)
        return replace(data, train=[index[n] for n in split["train"]], test=[index[n] for n in split["val"]])

    @property
    def stream_pack(self) -> Pack:
        """The pack ``data.pipeline=stream`` reads (``data.stream``): its classes, split and ``pack.json``."""
        if self._pack is None:
            self._pack = Pack.open(self.hparams.stream)
        return self._pack

    @property
    def held_out_names(self) -> list[str]:
        """The classes ``data.open_set.holdout`` holds out (none without it)."""
        return self._open_set_split.held_out if self.data is not None and self._open_set_split else []

    @property
    def open_set_samples(self) -> list[Sample]:
        """The held-out classes' test images (label = index in :attr:`held_out_names`): the unknown images."""
        return self._open_set_split.unknown if self.data is not None and self._open_set_split else []

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, as the copy gives them."""
        return self.data.class_names

    @property
    def car_names(self) -> list[CarName]:
        """Make, model and year of each class (label order), from the dataset's own metadata where it has some."""
        return self.data.car_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.pipeline == "stream":
            return self._setup_stream()
        hp, data = self.hparams, self.data
        split = load_or_make_split(data.train, hp.val_fraction, hp.split_seed, hp.split_dir)
        index = {s.name: i for i, s in enumerate(data.train)}
        train, val = ([data.train[index[n]] for n in split[k]] for k in ("train", "val"))
        test = [s for s in data.test if s.label != UNLABELED]
        bad = set(self._unreadable(data.train + test))
        if bad:
            train, val, test = ([s for s in part if s not in bad] for part in (train, val, test))
            split = {**split, "train": [s.name for s in train], "val": [s.name for s in val],
                     "skipped": sorted(sample_label(s) for s in bad)}
            CarsData(data.format, data.root, data.class_names, train, []).validate()  # still every class
        if hp.crop_to_bbox and any(s.bbox is None for s in train + val + test):  # (the unreadable ones left out)
            raise DatasetFormatError(
                f"data.crop_to_bbox=true needs a car box for every image, but the {data.format} copy at {data.root} "
                "has none (or not for every image): set data.crop_to_bbox=false"
            )
        if self._test_names is not None:
            split = {**split, "test": self._test_names}
        if self.held_out_names:
            split = {**split, "held_out": self.held_out_names}
        self.split = split
        margin = hp.bbox_margin if hp.crop_to_bbox else None
        train_tf, eval_tf = TrainImageTransform(self.preprocess, self.aug), EvalImageTransform(self.preprocess)
        dataset = CarsDataset
        if self.pipeline == "files":  # large JPEGs decoded at the reduced size that loses nothing (train: the
            # smallest random crop keeps image_size pixels each way)
            train_reader = partial(load_sample, min_side=train_decode_min_side(self.preprocess, self.aug))
            eval_reader = partial(load_sample, min_side=self.preprocess.decode_min_side)
        elif self.pipeline == "cache":
            train_reader = eval_reader = self._open_cache()
        else:  # on the device: the loader yields ImageRefs, the device does the rest
            dataset = DeviceRefDataset
            cache = DeviceCache(self._open_cache()) if self.pipeline == "gpu_cache" else None
            train_reader = eval_reader = partial(cache_ref, self.image_cache) if cache else read_encoded
            self.device_images = DeviceImages(train_tf, eval_tf, margin, cache)
        self.train_set = dataset(train, train_tf, margin, train_reader)
        self.val_set = dataset(val, eval_tf, margin, eval_reader)
        self.test_set = dataset(test, eval_tf, margin, eval_reader) if test else None
        if not test:
            log.warning("no test labels in %s (%s layout): test is skipped", data.root, data.format)
        self.train_batch_transform = BatchTransform(self.preprocess, self.aug, num_classes=self.num_classes)
        log.info(
            "%s: %d classes, %d train / %d val / %d test images%s",
            data.root, self.num_classes, len(train), len(val), len(test),
            f", cropped to the car box (+{hp.bbox_margin:g} per side)" if margin is not None else "",
        )

    def _setup_stream(self) -> None:
        """``data.pipeline=stream``: the pack's train shards streamed (``litdata.StreamingDataset``), its val and
        test items read one by one as samples (:func:`~twincar.data.stream.split_samples`), through the same
        decode, crop and transforms as ``files`` (images were checked when packed)."""
        hp, pack = self.hparams, self.stream_pack
        if hp.crop_to_bbox and not pack.meta.get("boxes"):
            raise DatasetFormatError(f"data.crop_to_bbox=true needs a car box for every image, but the pack at "
                                     f"{pack.location} has none (or not for every image): set data.crop_to_bbox=false")
        margin = hp.bbox_margin if hp.crop_to_bbox else None
        train_tf, eval_tf = TrainImageTransform(self.preprocess, self.aug), EvalImageTransform(self.preprocess)
        cache = None
        if hp.cache_dir and is_url(pack.location):  # remote chunks are downloaded here
            cache = str(Path(hp.cache_dir) / "stream" / hashlib.sha1(pack.location.encode()).hexdigest()[:12])
        train_item = StreamItem(train_tf, margin, train_decode_min_side(self.preprocess, self.aug))
        self.split = pack.split
        self.train_set = open_split(pack.location, "train", train_item, shuffle=True, seed=hp.split_seed,
                                    cache_dir=cache)
        # val and test: every image once over the ranks (eval_sampler), each item read from its shard
        eval_reader = partial(load_sample, min_side=self.preprocess.decode_min_side)
        counts = pack.meta.get("splits", {})
        self.val_set, self.test_set = (
            CarsDataset(split_samples(pack.location, part), eval_tf, margin, eval_reader) if counts.get(part) else None
            for part in ("val", "test"))
        self.train_batch_transform = BatchTransform(self.preprocess, self.aug, num_classes=self.num_classes)
        log.info("%s (stream): %d classes, %d train / %d val / %d test images", pack.location, self.num_classes,
                 counts.get("train", 0), counts.get("val", 0), counts.get("test", 0))

    def _unreadable(self, samples: list[Sample]) -> list[Sample]:
        """Header-check every image; ``fail``: stop naming the bad ones, ``skip``: record and return them."""
        bad = find_unreadable(samples, workers=max(4, self.hparams.num_workers))
        if not bad:
            return []
        if self.hparams.on_corrupt == "fail":
            shown = "; ".join(str(e) for _, e in bad[:10]) + (f"; and {len(bad) - 10} more" if len(bad) > 10 else "")
            raise TwinCarError(
                f"{len(bad)} unreadable image(s) in {self.data.root}: {shown}. Run `python -m twincar.check "
                f"{self.data.root} --format {self.data.format}` for the full list, fix or remove them, or set "
                "data.on_corrupt=skip to leave them out"
            )
        self._record_skipped([str(e) for _, e in bad])
        return [s for s, _ in bad]

    def _record_skipped(self, messages: list[str]) -> None:
        """Name each newly skipped image once, in the log and in ``skipped_file``."""
        new = [m for m in messages if m not in self.skipped]
        if not new:
            return
        self.skipped += new
        for m in new:
            log.warning("skipped (data.on_corrupt=skip): %s", m)
        if self.hparams.skipped_file and (self.trainer is None or self.trainer.is_global_zero):
            path = Path(self.hparams.skipped_file)  # rewritten whole (atomically), earlier lines kept
            kept = path.read_text("utf-8").splitlines() if path.is_file() else []
            write_text(path, "".join(f"{m}\n" for m in kept + [m for m in new if m not in kept]))

    @property
    def has_test_labels(self) -> bool:
        return self.test_set is not None

    # -- loaders ------------------------------------------------------------------------------
    def per_device_batch_size(self, world_size: int) -> int:
        """``batch_size`` is the global batch: each of ``world_size`` processes loads its share."""
        batch = per_device_batch_size(self.hparams.batch_size, world_size)
        if self.aug.mixes:
            check_mix_batch(batch, "data.batch_size per process (data.batch_size / processes)")
        return batch

    def _loader(self, dataset: CarsDataset, train: bool) -> DataLoader:
        hp = self.hparams
        world, rank = getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0)
        if train:
            batch_size = self.per_device_batch_size(world)
        else:  # the global eval batch, split (rounding up): it changes speed only, never the metrics
            batch_size = -(-(hp.eval_batch_size or hp.batch_size) // world)
        sampler = None if train else eval_sampler(dataset, world, rank)  # train: Lightning's DistributedSampler
        collate = collate_readable
        workers = hp.num_workers
        if self.pipeline == "stream" and train:  # LitData gives each rank and worker its part: no sampler
            return streaming_loader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                    pin_memory=hp.pin_memory and torch.cuda.is_available(),
                                    drop_last=train and self.aug.mixes)
        if self.device_images is not None:
            device_paths.check_cuda(f"data.pipeline={self.pipeline}")
            collate = partial(collate_readable, collate_images=ImageRefs)
            workers = 0 if self.pipeline == "gpu_cache" else workers  # only offsets are looked up: nothing to spread
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train and self.aug.mixes,  # Mixup/CutMix pairs samples: keep every batch full and even
            num_workers=workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise RuntimeError(f"{self.data.root} ({self.data.format} layout) has no test labels")
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Per-batch work on the device. Training batches become ``(images, labels, targets)``,
        where ``targets`` are soft when Mixup/CutMix is on; eval batches ``(images, labels)``."""
        images, labels, *failed = batch
        failed = list(failed[0]) if failed else []
        training = self.trainer is not None and self.trainer.training
        if self.device_images is not None and len(labels):  # GPU input paths: decode, crop, transform here
            images, labels, lost = self.device_images(images, labels, training)
            failed += lost
        if failed:
            self._decode_failures(failed)
            if not len(labels):
                raise TwinCarError(f"no image of a batch could be decoded ({failed[0]}, ...): run "
                                   f"`python -m twincar.check {self.data.root}`")
        if training:
            if self.aug.mixes and len(labels) % 2:  # an image was left out: Mixup/CutMix pairs need an even batch
                images, labels = images[:-1], labels[:-1]
            x, targets = self.train_batch_transform(images, labels)
            return x, labels, targets
        return self.eval_batch_transform(images), labels

    def _decode_failures(self, messages: list[str]) -> None:
        """Images that passed the header check but failed to decode in a worker (e.g. truncated files)."""
        if self.hparams.on_corrupt == "fail":
            raise TwinCarError(
                f"{messages[0]}: run `python -m twincar.check {self.data.root}` to find every damaged image, "
                "fix or remove them, or set data.on_corrupt=skip to leave them out"
            )
        self._record_skipped(messages)
