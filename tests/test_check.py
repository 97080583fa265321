import json
import shutil

from tests.conftest import SMALL_SPEC
from twincar.data.check import main


def test_clean_copy_passes_and_counts_grayscale(small_root, capsys):
    assert main([str(small_root)]) == 0
    out = capsys.readouterr().out
    n_train = SMALL_SPEC["num_classes"] * SMALL_SPEC["train_per_class"]
    assert f"train: {n_train} images, 0 unusable, 0 with problems" in out


def test_broken_and_missing_images_are_named_and_fail_the_scan(small_root, tmp_path, capsys):
    root = tmp_path / "copy"
    shutil.copytree(small_root, root)
    (root / "cars_train" / "00003.jpg").write_bytes(b"\xff\xd8 broken")
    (root / "cars_test" / "00002.jpg").unlink()
    assert main([str(root), "--report", str(tmp_path / "report.json")]) == 1
    out = capsys.readouterr().out
    assert f"train: {root / 'cars_train' / '00003.jpg'}: unreadable" in out
    assert f"test: {root / 'cars_test' / '00002.jpg'}: missing" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["splits"]["train"]["unusable"] == 1 and report["splits"]["test"]["unusable"] == 1


def test_not_a_dataset_is_one_sentence(tmp_path, capsys):
    assert main([str(tmp_path / "nothing")]) == 2
    assert "does not exist: pass data.root=PATH" in capsys.readouterr().err
