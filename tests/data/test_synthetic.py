"""Tests for the synthetic Stanford-Cars-like dataset generator (twincar.data.synthetic)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from twincar import synthetic as synthetic_tool
from twincar.data import synthetic
from twincar.data.classes import parse_car_name, stanford_cars_class_names
from twincar.data.formats import load_stanford_cars
from twincar.data.synthetic import SyntheticSpec, generate, select_classes
from twincar.data.synthetic.render import car_design, render_car

SIBLING_FAMILIES = [
    "Audi S4 Sedan",
    "Bentley Continental GT Coupe",
    "Dodge Caliber Wagon",
    "Dodge Durango SUV",
    "Ford F-150 Regular Cab",
    "Honda Odyssey Minivan",
    "Volkswagen Golf Hatchback",
]
TINY = SyntheticSpec(num_classes=4, train_per_class=6, test_per_class=3, width=64, height=48, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return generate(tmp_path_factory.mktemp("syn") / "cars", TINY)


# ---------------------------------------------------------------------------------- classes


def test_select_classes_default_is_the_seven_year_pairs_in_official_order():
    official = stanford_cars_class_names()
    names = select_classes(14)
    assert len(names) == 14 and set(names) <= set(official)
    assert names == sorted(names, key=official.index)
    families = Counter(parse_car_name(n).family for n in names)
    assert sorted(families) == sorted(SIBLING_FAMILIES)
    assert set(families.values()) == {2}


def test_select_classes_takes_whole_pairs_then_same_make_models():
    assert select_classes(2) == ["Audi S4 Sedan 2012", "Audi S4 Sedan 2007"]
    odd = select_classes(13)  # 6 whole pairs + one other model of a sibling make
    assert Counter(Counter(parse_car_name(n).family for n in odd).values()) == {2: 6, 1: 1}
    more = select_classes(20)
    assert set(select_classes(14)) <= set(more)
    extra = set(more) - set(select_classes(14))
    sibling_makes = {parse_car_name(f + " 2012").make for f in SIBLING_FAMILIES}
    assert {parse_car_name(n).make for n in extra} <= sibling_makes
    assert select_classes(196) == stanford_cars_class_names()
    assert select_classes(37) == select_classes(37)


@pytest.mark.parametrize("bad", [0, 197, -1])
def test_select_classes_rejects_out_of_range(bad):
    with pytest.raises(ValueError, match="between 1 and 196"):
        select_classes(bad)


def test_year_siblings_share_the_silhouette_and_differ_in_the_detail():
    for family in SIBLING_FAMILIES:
        a, b = (car_design(n) for n in stanford_cars_class_names() if parse_car_name(n).family == family)
        assert a.outline == b.outline and a.make == b.make
        assert a.year_detail != b.year_detail
    assert car_design("Dodge Caliber Wagon 2012").make == car_design("Dodge Durango SUV 2012").make
    assert car_design("Dodge Caliber Wagon 2012").outline != car_design("Dodge Durango SUV 2012").outline


def test_year_siblings_images_differ_only_in_a_small_region():
    """Rendered with the same random draws, two siblings differ only where the detail is."""
    fractions = []
    for seed in range(6):
        imgs = [
            np.asarray(
                render_car(parse_car_name(n), np.random.default_rng(seed), 128, 96, 0.5)[0].convert("L"), dtype=np.int16
            )
            for n in ("Honda Odyssey Minivan 2012", "Honda Odyssey Minivan 2007")
        ]
        fractions.append(float((np.abs(imgs[0] - imgs[1]) > 25).mean()))
    assert 0.0 < np.mean(fractions) < 0.05


# ---------------------------------------------------------------------------------- spec


def test_spec_validates_fields_with_clear_errors():
    for kwargs, field in [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 197}, "num_classes"),
        ({"train_per_class": 0}, "train_per_class"),
        ({"width": 8}, "width"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"difficulty": float("nan")}, "difficulty"),
        ({"seed": -1}, "seed"),
        ({"height": 2.5}, "height"),
    ]:
        with pytest.raises(ValueError, match=field):
            SyntheticSpec(**kwargs)


def test_fingerprint_is_short_stable_and_covers_every_field():
    base = SyntheticSpec()
    assert base.fingerprint() == SyntheticSpec().fingerprint()
    assert len(base.fingerprint()) == 12
    changed = [
        SyntheticSpec(num_classes=13),
        SyntheticSpec(train_per_class=41),
        SyntheticSpec(test_per_class=11),
        SyntheticSpec(width=129),
        SyntheticSpec(height=97),
        SyntheticSpec(difficulty=0.6),
        SyntheticSpec(seed=1),
    ]
    assert len({s.fingerprint() for s in changed} | {base.fingerprint()}) == 8


# ---------------------------------------------------------------------------------- generate


def test_generate_writes_the_devkit_layout(tiny_root):
    for rel in (
        "devkit/cars_meta.mat",
        "devkit/cars_train_annos.mat",
        "devkit/cars_test_annos.mat",
        "cars_test_annos_withlabels.mat",
        "cars_train/00001.jpg",
        "cars_test/00001.jpg",
        synthetic.MARKER_FILE,
    ):
        assert (tiny_root / rel).is_file(), rel
    assert len(list((tiny_root / "cars_train").glob("*.jpg"))) == 24
    assert len(list((tiny_root / "cars_test").glob("*.jpg"))) == 12
    marker = json.loads((tiny_root / synthetic.MARKER_FILE).read_text())
    assert marker["fingerprint"] == TINY.fingerprint()
    assert not [p for p in tiny_root.parent.iterdir() if p.name.startswith(".")]  # no temp dir left


def test_loader_reads_it_back_with_labels_counts_and_boxes(tiny_root):
    train, names = load_stanford_cars(tiny_root, "train")
    test, test_names = load_stanford_cars(tiny_root, "test")
    assert names == test_names == select_classes(4)
    assert Counter(s.label for s in train) == {i: 6 for i in range(4)}
    assert Counter(s.label for s in test) == {i: 3 for i in range(4)}
    assert [s.path.name for s in train] == [f"{i:05d}.jpg" for i in range(1, 25)]
    labels = [s.label for s in train]
    assert labels != sorted(labels)  # interleaved, not grouped by class
    for s in train + test:
        with Image.open(s.path) as im:
            assert im.size == (64, 48) and im.format == "JPEG"
        x1, y1, x2, y2 = s.bbox
        assert 1 <= x1 < x2 <= 64 and 1 <= y1 < y2 <= 48
        assert (x2 - x1) > 20  # the car spans much of the width


def test_some_images_are_grayscale_jpegs():
    modes = Counter(
        render_car(parse_car_name("Audi S4 Sedan 2012"), np.random.default_rng([9, i]), 48, 36, 0.5)[0].mode
        for i in range(300)
    )
    assert set(modes) == {"RGB", "L"}
    assert 0.02 < modes["L"] / 300 < 0.12


def test_generated_dataset_contains_grayscale_files(tiny_root):
    modes = Counter(Image.open(p).mode for p in sorted(tiny_root.rglob("*.jpg")))
    assert modes["L"] >= 1 and modes["RGB"] > modes["L"]


def test_same_spec_gives_identical_bytes_and_another_seed_different_images(tmp_path, tiny_root):
    again = _files(generate(tmp_path / "again", TINY))
    assert again == _files(tiny_root)
    other = generate(tmp_path / "other", SyntheticSpec(**{**TINY.__dict__, "seed": 4}))
    assert (other / "cars_train/00001.jpg").read_bytes() != (tiny_root / "cars_train/00001.jpg").read_bytes()


def test_image_does_not_depend_on_generation_order():
    first = synthetic.render_sample(TINY, "train", 5, "Audi S4 Sedan 2012")
    synthetic.render_sample(TINY, "train", 6, "Audi S4 Sedan 2012")
    again = synthetic.render_sample(TINY, "train", 5, "Audi S4 Sedan 2012")
    assert first[1] == again[1] and np.array_equal(np.asarray(first[0]), np.asarray(again[0]))


def test_second_generate_is_a_cache_hit(tiny_root):
    before = {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")}
    assert generate(tiny_root, TINY) == tiny_root
    assert {p: p.stat().st_mtime_ns for p in tiny_root.rglob("*")} == before


def test_generate_never_overwrites_something_else(tmp_path, tiny_root):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not the synthetic dataset"):
        generate(busy, TINY)
    assert (busy / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):  # a dataset of another spec
        generate(tiny_root, SyntheticSpec(**{**TINY.__dict__, "seed": 99}))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        generate(empty, SyntheticSpec(num_classes=1, train_per_class=1, test_per_class=1, width=32, height=32)) == empty
    )


def test_cli_generates_then_reuses(tmp_path, capsys):
    out = tmp_path / "cli"
    args = [
        "--out",
        str(out),
        "--num-classes",
        "2",
        "--train-per-class",
        "2",
        "--test-per-class",
        "1",
        "--width",
        "48",
        "--height",
        "36",
        "--difficulty",
        "0.3",
        "--seed",
        "5",
    ]
    assert synthetic_tool.main(args) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and str(out) in printed
    assert synthetic_tool.main(args) == 0
    assert "reused" in capsys.readouterr().out
    train, names = load_stanford_cars(out, "train")
    assert len(train) == 4 and len(names) == 2
    with pytest.raises(SystemExit):
        synthetic_tool.main(["--out", str(tmp_path / "bad"), "--num-classes", "0"])
