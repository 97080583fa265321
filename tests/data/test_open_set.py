"""The open-set split (data.open_set.holdout): train on the known classes, the held-out classes' test images unknown."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SMALL_SPEC
from tests.layouts import LAYOUTS, NAMES, TEST_PER_CLASS, build, make_images
from twincar.data.classes import same_class_names
from twincar.data.datamodule import CarsDataModule
from twincar.data.formats import load_dataset
from twincar.errors import TwinCarError


def datamodule(root, tmp_path, **open_set) -> CarsDataModule:
    dm = CarsDataModule(root=str(root), image_size=64, batch_size=8, num_workers=0, split_dir=str(tmp_path / "splits"),
                        open_set=open_set)
    dm.setup("fit")
    return dm


def test_holding_out_two_classes_leaves_the_others_relabelled_and_their_test_images_unknown(small_root, tmp_path):
    full = load_dataset(small_root)
    dm = datamodule(small_root, tmp_path, holdout=2, seed=3)
    held = [full.class_names.index(n) for n in dm.held_out_names]
    known = [i for i in range(len(full.class_names)) if i not in held]
    assert len(held) == 2 and held == sorted(held)
    assert dm.class_names == [full.class_names[i] for i in known] and dm.num_classes == SMALL_SPEC["num_classes"] - 2
    # every known image keeps its class, under its new label; no image of a held-out class is trained on
    name_of = {s.path: full.class_names[s.label] for s in full.train + full.test}
    trained = dm.train_set.samples + dm.val_set.samples
    assert {s.path for s in trained} == {s.path for s in full.train if s.label in known}
    for s in trained + dm.test_set.samples:
        assert dm.class_names[s.label] == name_of[s.path]
    # the unknown images are exactly the held-out classes' test images
    assert sorted(s.path for s in dm.open_set_samples) == sorted(s.path for s in full.test if s.label in held)
    assert len(dm.open_set_samples) == 2 * SMALL_SPEC["test_per_class"]
    assert {dm.held_out_names[s.label] for s in dm.open_set_samples} == set(dm.held_out_names)
    assert dm.split["held_out"] == dm.held_out_names  # saved with the run (split.json)
    # the rule is seeded: the same seed holds out the same classes, another seed others
    assert datamodule(small_root, tmp_path, holdout=2, seed=3).held_out_names == dm.held_out_names
    assert any(datamodule(small_root, tmp_path, holdout=2, seed=s).held_out_names != dm.held_out_names
               for s in (4, 5))


def test_a_holdout_file_names_classes_by_name_or_label_and_an_unknown_name_is_one_sentence(small_root, tmp_path):
    names = load_dataset(small_root).class_names
    listed = tmp_path / "holdout.txt"
    listed.write_text(f"# held out\n  {names[4].upper()}  \n\n1\n")  # case and spacing ignored; 0-based label
    dm = datamodule(small_root, tmp_path, holdout=str(listed))
    assert dm.held_out_names == [names[1], names[4]] and dm.class_names == [names[i] for i in (0, 2, 3, 5)]
    listed.write_text(f"{names[0]}\nBMW M3 Coupe 1999\n")
    with pytest.raises(TwinCarError, match=rf"^{listed}, line 2: 'BMW M3 Coupe 1999' is not a class of the data"):
        datamodule(small_root, tmp_path, holdout=str(listed))
    for holdout, message in ((5, "must be between 1 and 4"), (str(tmp_path / "none.txt"), "no such file")):
        with pytest.raises(TwinCarError, match=message):
            datamodule(small_root, tmp_path, holdout=holdout)
    with pytest.raises(TwinCarError, match="data.open_set has no option hold"):
        CarsDataModule(root=str(small_root), open_set={"hold": 2})


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_holds_out_a_class(tmp_path, layout):
    root = build(layout, tmp_path / layout, make_images())
    listed = tmp_path / "holdout.txt"
    listed.write_text(NAMES[1] + "\n")
    dm = datamodule(root, tmp_path, holdout=str(listed))
    # (the parquet copy names its classes in lower case: the one class-name rule matches them)
    assert same_class_names(dm.class_names, [NAMES[0], NAMES[2]]) and same_class_names(dm.held_out_names, [NAMES[1]])
    assert len(dm.open_set_samples) == TEST_PER_CLASS and {s.label for s in dm.test_set.samples} == {0, 1}


def test_eval_of_a_holdout_model_scores_the_held_out_classes_as_unknown(small_root, tmp_path):
    """ood=auto (the default) is ood=holdout for data with held-out classes; a random network: no training."""
    import timm
    import torch

    from tests.trained import compose
    from twincar.data.preprocess import Preprocess
    from twincar.evaluation.recipes import evaluate
    from twincar.models.card import build_model_card, write_model_card
    from twincar.models.checkpoint import export_state_dict

    overrides = ["data=stanford_cars", f"data.root={small_root}", f"paths.data_dir={tmp_path}", "data.image_size=64",
                 "data.open_set.holdout=2", "data.num_workers=0"]
    known = datamodule(small_root, tmp_path, holdout=2).class_names
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_model_card(model_dir, build_model_card(known, Preprocess(image_size=64), "resnet18"))
    model = export_state_dict(timm.create_model("resnet18", num_classes=len(known)), model_dir / "model.pth")
    m = evaluate(compose("eval", [f"ckpt={model}", f"paths.output_dir={tmp_path / 'eval'}", "progress=false",
                                  "top_losses=0", "confused_pairs=0", *overrides]))
    assert m["ood/images"] == 2 * SMALL_SPEC["test_per_class"] and 0 <= m["ood/auroc"] <= 1
    assert json.loads((tmp_path / "eval" / "reports" / "metrics.json").read_text())["ood"] == "holdout"
    m = evaluate(compose("eval", [f"ckpt={model}", f"paths.output_dir={tmp_path / 'none'}", "progress=false",
                                  "top_losses=0", "confused_pairs=0", "ood=none", *overrides]))
    assert "ood/images" not in m


def test_the_end_of_training_reports_the_held_out_classes_as_its_open_set(small_root, tmp_path):
    """calibrate_best (the last step of train) on a held-out split, with a random network: nothing is trained."""
    from types import SimpleNamespace

    import timm
    import torch

    from twincar.training.steps import calibrate_best

    dm = datamodule(small_root, tmp_path, holdout=2)
    torch.manual_seed(0)
    model = SimpleNamespace(model=timm.create_model("resnet18", num_classes=dm.num_classes), device="cpu",
                            class_names=dm.class_names, hparams={})
    metrics = {"test/acc": 0.0}
    calibrate_best(model, dm, metrics, best="")
    assert metrics["ood/images"] == len(dm.open_set_samples) == 2 * SMALL_SPEC["test_per_class"]
    assert 0 <= metrics["ood/auroc"] <= 1 and "calibration" in model.hparams
