"""Bad arguments and outputs: one sentence before any work, nothing already written lost."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import run_cli


# -- predict: arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["-b", "0"], "--batch-size must be at least 1, got 0"),
    (["--workers", "-2"], "--workers must be at least 0, got -2"),
    (["--topk", "0"], "--topk must be at least 1, got 0"),
    (["--img-size", "-3"], "--img-size must be a positive number of pixels, got -3"),
    (["--img-size", "0"], "--img-size must be a positive number of pixels, got 0"),
    (["--img-size", "7"], "--img-size 7 is smaller than resnet18 takes: its features are 32x smaller than the "
                          "input, so give at least 32 pixels"),
    (["--device", "gpu"], "--device gpu is not a device: use auto, cpu, cuda or cuda:N"),
])
def test_predict_arguments_are_one_sentence(tiny_export, car_images, tmp_path, capsys, args, message):
    from twincar.predict import main

    out = tmp_path / "p.csv"
    assert main(["--images", str(car_images[0]), "--model", str(tiny_export), "-o", str(out), *args]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message}\n"
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_predict_on_cuda_without_a_gpu_says_so(tiny_export, car_images, tmp_path, capsys):
    from twincar.predict import main

    assert main(["--images", str(car_images[0]), "--model", str(tiny_export), "-o", str(tmp_path / "p.csv"),
                 "--device", "cuda"]) == 1
    expected = "error: --device cuda: no CUDA GPU is available here: use --device cpu (or auto)\n"
    assert capsys.readouterr().err == expected


# -- predict: the output file --------------------------------------------------------------------------------
def test_an_output_that_is_a_folder_or_under_a_file_is_refused_before_the_model_loads(
        tiny_export, car_images, tmp_path, capsys, monkeypatch):
    import twincar.inference
    from twincar.predict import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(twincar.inference.Predictor, "load", no_load)
    (tmp_path / "a_file").write_text("x")
    base = ["--images", str(car_images[0]), "--model", str(tiny_export)]
    assert main([*base, "-o", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (f"error: --output {tmp_path} is a folder: pass a file path, e.g. "
                                       f"{tmp_path / 'predictions.csv'}\n")
    assert main([*base, "-o", str(tmp_path / "a_file" / "p.csv")]) == 1
    assert capsys.readouterr().err == (f"error: --output {tmp_path / 'a_file' / 'p.csv'}: {tmp_path / 'a_file'} is a "
                                       "file, not a folder\n")


def test_a_run_where_every_image_fails_keeps_the_old_output(tiny_export, car_images, tmp_path, capsys):
    from twincar.predict import main

    out = tmp_path / "p.csv"
    assert main(["--images", *map(str, car_images), "--model", str(tiny_export), "-o", str(out)]) == 0
    before = out.read_bytes()
    os.chmod(out, 0o644)
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["--images", str(bad), "--model", str(tiny_export), "-o", str(out)]) == 1
    assert out.read_bytes() == before
    assert "none of the 1 image(s) could be read" in capsys.readouterr().err
    assert main(["--images", str(bad), "--model", str(tiny_export), "-o", str(tmp_path / "new.csv")]) == 1
    assert "cannot read image" in (tmp_path / "new.csv").read_text()  # no old file: the error rows are written


def test_a_replaced_output_gets_the_mode_the_umask_gives(tiny_export, car_images, tmp_path):
    from twincar.predict import main

    out = tmp_path / "p.csv"
    old = os.umask(0o022)
    try:
        for _ in range(2):  # written, then replaced
            assert main(["--images", str(car_images[0]), "--model", str(tiny_export), "-o", str(out)]) == 0
            assert out.stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(old)


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only filesystem (a tmpfs mounted ro as root): the one place root is refused a write."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a read-only tmpfs")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=False)


def test_an_unwritable_output_says_permission_denied(tiny_export, car_images, read_only_dir, capsys):
    from twincar.predict import main

    out = read_only_dir / "p.csv"
    assert main(["--images", str(car_images[0]), "--model", str(tiny_export), "-o", str(out)]) == 1
    assert capsys.readouterr().err == f"error: --output {out}: permission denied on the folder {read_only_dir}\n"


# -- eval, explain, export: where they write ------------------------------------------------------------------
def test_explain_and_export_refuse_an_output_under_a_file_before_any_work(tiny_export, car_images, tmp_path):
    (tmp_path / "a_file").write_text("x")
    explained = run_cli("twincar.explain", "--images", str(car_images[0]), "--model", str(tiny_export),
                        "--out", str(tmp_path / "a_file" / "cams"), cwd=tmp_path)
    assert explained.returncode == 1
    assert f"--out {tmp_path / 'a_file' / 'cams'}: {tmp_path / 'a_file'} is a file, not a folder" in explained.stderr
    exported = run_cli("twincar.export", f"ckpt={tiny_export}", "format=pth", f"out={tmp_path / 'a_file' / 'x'}",
                       cwd=tmp_path)
    assert exported.returncode == 1
    assert f"out={tmp_path / 'a_file' / 'x'}: {tmp_path / 'a_file'} is a file, not a folder" in exported.stdout
    assert "Traceback" not in explained.stderr + exported.stderr + exported.stdout


def test_an_unusable_hydra_run_dir_is_one_sentence(tmp_path):
    (tmp_path / "a_file").write_text("x")
    run = run_cli("twincar.eval", "ckpt=model.pth", f"hydra.run.dir={tmp_path / 'a_file' / 'run'}", cwd=tmp_path)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"error: hydra.run.dir={tmp_path / 'a_file' / 'run'}: {tmp_path / 'a_file'} is a "
                                  "file, not a folder: pass a writable hydra.run.dir=DIR")


# -- train: data options ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("option, message", [
    (dict(batch_size=0), "data.batch_size=0 must be a whole number of at least 1"),
    (dict(num_workers=-1), "data.num_workers=-1 must be a whole number of at least 0"),
    (dict(image_size=0), "data.image_size=0 must be a whole number of at least 1"),
])
def test_data_options_are_one_sentence(small_root, option, message):
    from twincar.data.datamodule import CarsDataModule
    from twincar.errors import TwinCarError

    with pytest.raises(TwinCarError, match=f"^{message}$"):
        CarsDataModule(root=str(small_root), **option)


def test_a_data_root_that_is_a_file_says_so(tmp_path):
    from twincar.data.formats import DatasetFormatError, load_dataset

    (tmp_path / "cars.zip").write_bytes(b"PK")
    with pytest.raises(DatasetFormatError, match=f"^dataset root {tmp_path / 'cars.zip'} is a file, not a folder: "):
        load_dataset(tmp_path / "cars.zip")


def test_an_image_size_below_what_the_model_takes_stops_training(small_root, tmp_path):
    from omegaconf import OmegaConf

    from twincar.data.datamodule import CarsDataModule
    from twincar.errors import TwinCarError
    from twincar.training.run import build_model

    cfg = OmegaConf.create({"model": {"name": "resnet18"}, "optimizer": {"name": "adam", "lr": 1e-3},
                            "scheduler": {"name": "none"}})
    dm = CarsDataModule(root=str(small_root), image_size=7)
    with pytest.raises(TwinCarError, match="^data.image_size=7 is smaller than resnet18 takes: its features are 32x "
                                           "smaller than the input, so give at least 32 pixels$"):
        build_model(cfg, dm)
