"""CarsDataModule: a Stanford Cars devkit copy (real or synthetic) -> split, datasets, loaders."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from twincar.data.formats import UNLABELED, DevkitPaths, Sample, load_stanford_cars, read_meta
from twincar.data.synthetic import SyntheticSpec, generate
from twincar.data.transforms import (
    Augmentation,
    BatchTransform,
    EvalImageTransform,
    ImageReadError,
    Preprocess,
    TrainImageTransform,
    load_rgb,
)
from twincar.distributed import eval_sampler, per_device_batch_size

log = logging.getLogger(__name__)


class CarsDataset(Dataset):
    """Images and labels from a list of samples; an unreadable image is reported and replaced.

    A file that cannot be decoded is logged once (naming the file) and the next readable sample is
    returned instead, so one bad JPEG never stops an epoch. ``bad_files`` lists what was skipped
    (per worker process).
    """

    def __init__(self, samples: Sequence[Sample], transform: torch.nn.Module):
        self.samples = list(samples)
        self.transform = transform
        self.bad_files: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            sample = self.samples[(index + offset) % len(self.samples)]
            if sample.path in self.bad_files:
                continue
            try:
                return self.transform(load_rgb(sample.path)), sample.label
            except ImageReadError as e:
                self.bad_files.add(sample.path)
                log.warning("skipping unreadable image: %s", e)
        raise ImageReadError(f"no readable image among the {len(self.samples)} samples of this dataset")


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of a stratified train/val split: every class with >= 2 images has >= 1 in val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(len(idx) - 1, max(1, round(len(idx) * val_fraction)))
        val.extend(idx[:n_val].tolist())
        train.extend(idx[n_val:].tolist())
    return sorted(train), sorted(val)


def load_or_make_split(
    samples: Sequence[Sample], val_fraction: float, seed: int, cache_dir: str | Path | None
) -> dict:
    """The stratified train/val split of ``samples`` as file names: ``{"train": [...], "val": [...], ...}``.

    The split is cached in ``cache_dir`` under a hash of the samples (names and labels), the
    fraction and the seed, and read back from there when the same data and seed are split again.
    """
    key = hashlib.sha1(json.dumps([[s.path.name, s.label] for s in samples] + [val_fraction, seed]).encode())
    cache = Path(cache_dir) / f"split_{key.hexdigest()[:12]}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            split = json.loads(cache.read_text())
            log.info("reusing split %s", cache)
            return split
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable split cache %s: %s", cache, e)
    train, val = stratified_split([s.label for s in samples], val_fraction, seed)
    split = {"val_fraction": val_fraction, "seed": seed,
             "train": [samples[i].path.name for i in train], "val": [samples[i].path.name for i in val]}
    if cache is not None:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(split))
            tmp.replace(cache)  # atomic: parallel runs never read half a file
        except OSError as e:
            log.warning("could not cache the split in %s: %s", cache.parent, e)
    return split


class CarsDataModule(L.LightningDataModule):
    """Stanford Cars in the devkit layout: official train split -> stratified train/val, official test.

    With ``synthetic`` set, the embedded dataset for that spec is generated (once, cached) under
    ``root/<fingerprint>`` and read by the very same loader.
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
        split_seed: int = 42,
        split_dir: str | None = None,
        augmentation: dict | None = None,
        synthetic: dict | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.preprocess = Preprocess(image_size=image_size, eval_crop_pct=eval_crop_pct)
        self.aug = Augmentation.from_config(augmentation)
        if self.aug.mixes and batch_size % 2:
            raise ValueError(f"Mixup/CutMix needs an even data.batch_size, got {batch_size}")
        self.spec = SyntheticSpec(**synthetic) if synthetic is not None else None
        self.root = Path(root) / self.spec.fingerprint() if self.spec else Path(root)
        self.split: dict | None = None  # the train/val file names in use, saved next to the run
        self._class_names: list[str] | None = None
        self.train_set = self.val_set = self.test_set = None
        self.train_batch_transform: BatchTransform | None = None
        self.eval_batch_transform = BatchTransform(self.preprocess)

    # -- data on disk -------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Generate the embedded dataset if this is a synthetic run (a no-op when cached)."""
        if self.spec is not None:
            generate(self.root, self.spec)

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, from the dataset's ``cars_meta.mat``."""
        if self._class_names is None:
            self._class_names = read_meta(DevkitPaths.locate(self.root).meta)
        return self._class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_samples, self._class_names = load_stanford_cars(self.root, "train")
        test_samples, _ = load_stanford_cars(self.root, "test")
        hp = self.hparams
        self.split = load_or_make_split(train_samples, hp.val_fraction, hp.split_seed, hp.split_dir)
        index = {s.path.name: i for i, s in enumerate(train_samples)}
        train_idx, val_idx = ([index[n] for n in self.split[k]] for k in ("train", "val"))
        eval_tf = EvalImageTransform(self.preprocess)
        self.train_set = CarsDataset(
            [train_samples[i] for i in train_idx], TrainImageTransform(self.preprocess, self.aug)
        )
        self.val_set = CarsDataset([train_samples[i] for i in val_idx], eval_tf)
        labeled = [s for s in test_samples if s.label != UNLABELED]
        self.test_set = CarsDataset(labeled, eval_tf) if labeled else None
        if not labeled:
            log.warning("no test labels under %s (cars_test_annos_withlabels.mat): test is skipped", self.root)
        self.train_batch_transform = BatchTransform(self.preprocess, self.aug, num_classes=self.num_classes)
        log.info(
            "%s: %d classes, %d train / %d val / %d test images",
            self.root, self.num_classes, len(self.train_set), len(self.val_set), len(labeled),
        )

    @property
    def has_test_labels(self) -> bool:
        return self.test_set is not None

    # -- loaders ------------------------------------------------------------------------------
    def per_device_batch_size(self, world_size: int) -> int:
        """``batch_size`` is the global batch: each of ``world_size`` processes loads its share."""
        batch = per_device_batch_size(self.hparams.batch_size, world_size)
        if self.aug.mixes and batch % 2:
            raise ValueError(f"Mixup/CutMix needs an even batch per process, got {batch} (data.batch_size / processes)")
        return batch

    def _loader(self, dataset: CarsDataset, train: bool) -> DataLoader:
        hp = self.hparams
        world, rank = getattr(self.trainer, "world_size", 1), getattr(self.trainer, "global_rank", 0)
        if train:
            batch_size = self.per_device_batch_size(world)
        else:  # the global eval batch, split (rounding up): it changes speed only, never the metrics
            batch_size = -(-(hp.eval_batch_size or hp.batch_size) // world)
        sampler = None if train else eval_sampler(dataset, world, rank)  # train: Lightning's DistributedSampler
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=train,
            sampler=sampler,
            drop_last=train and self.aug.mixes,  # Mixup/CutMix pairs samples: keep every batch full and even
            num_workers=hp.num_workers,
            pin_memory=hp.pin_memory and torch.cuda.is_available(),
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            raise RuntimeError(f"{self.root} has no test labels (cars_test_annos_withlabels.mat)")
        return self._loader(self.test_set, train=False)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Per-batch work on the device. Training batches become ``(images, labels, targets)``,
        where ``targets`` are soft when Mixup/CutMix is on; eval batches ``(images, labels)``."""
        images, labels = batch
        if self.trainer is not None and self.trainer.training:
            x, targets = self.train_batch_transform(images, labels)
            return x, labels, targets
        return self.eval_batch_transform(images), labels
