"""Shipping a model to people who have never heard of TwinCar: the timm hub format, the model card as a contract a
plain onnxruntime client follows, the torch-free runtime, and the wheel."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import REPO, TINY_NAMES
from tests.trained import trained_run
from twincar import Predictor
from twincar.data.preprocess import Preprocess
from twincar.export import ExportError, export_model
from twincar.inference.preprocess import normalise
from twincar.models import WeightsError
from twincar.models.card import build_model_card, write_model_card
from twincar.models.loading import resolve_model_source


@pytest.fixture(autouse=True)
def _global_rng_untouched():
    """Building networks draws from torch's global generator: put it back, so the tests after these see the
    random state they would see without them."""
    state = torch.random.get_rng_state()
    yield
    torch.random.set_rng_state(state)


def timm_model(spec: str, **kwargs):
    import timm

    return timm.create_model(spec, pretrained=True, **kwargs).eval()


def hub_cache(tmp_path: Path, folder: Path, repo: str, monkeypatch) -> Path:
    """A Hugging Face cache holding ``folder`` as the main revision of ``repo``, as ``hf download`` leaves it."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    entry = cache / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


# -- fast: the hub format on a random model ---------------------------------------------------------------
@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_hf_export_loads_in_timm_and_twincar_with_the_same_logits(tiny_export, tmp_path, monkeypatch, umask_022):
    out = tmp_path / "hf"
    export_model(tiny_export, "hf", out, license="apache-2.0")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                      "model_card.json"]
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {"0o644"}  # not mkstemp's 0600
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 6 and config["label_names"] == TINY_NAMES
    assert config["num_features"] == 512 and config["global_pool"] == "avg"
    assert {k: config["pretrained_cfg"][k] for k in ("input_size", "crop_pct", "crop_mode", "interpolation")} == \
        {"input_size": [3, 64, 64], "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bilinear"}
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt" and f.metadata()["architecture"] == "resnet18"
    readme = (out / "README.md").read_text()
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["library_name"] == "timm" and front["license"] == "apache-2.0" and front["datasets"]
    assert 'timm.create_model("local-dir:' in readme and "twincar-predict" in readme and "Ford F-150" in readme

    x = torch.randn(3, 3, 64, 64)
    # the same memory format as the Predictor's (channels-last), so that the same kernels run and logits are equal
    twincar_net = Predictor.load(tiny_export, device="cpu").model
    same_format = lambda net: net.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = twincar_net(x)
        local = same_format(timm_model(f"local-dir:{out}"))
        assert torch.equal(local(x), expected)  # the head is the trained one, not re-initialised
        hub_cache(tmp_path, out, "someone/twincar-tiny", monkeypatch)
        assert torch.equal(same_format(timm_model("hf-hub:someone/twincar-tiny"))(x), expected)
        for spec in (f"local-dir:{out}", "hf-hub:someone/twincar-tiny"):
            p = Predictor.load(spec, device="cpu")
            assert p.class_names == TINY_NAMES and p.preprocess == Preprocess(image_size=64)
            assert torch.equal(p.model(x), expected)


@pytest.mark.parametrize("size,crop", [(64, 0.875), (70, 0.9), (224, 0.95)])
def test_timms_transform_is_twincars_eval_transform(size, crop, tmp_path):
    """timm's resolve_data_config + create_transform on the export's config give TwinCar's prepared pixels (within
    one grey level: rounding) and the same normalisation, whatever the
    rounding of the resize (70 / 0.9 = 77.8: TwinCar rounds, timm floors)."""
    import timm
    from timm.data import create_transform, resolve_data_config

    from twincar.models.hub import hub_config

    pre = Preprocess(image_size=size, eval_crop_pct=crop)
    net = timm.create_model("resnet18", num_classes=6)
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hub_config(net, TINY_NAMES, pre, "resnet18")))
    from safetensors.torch import save_file

    save_file(net.state_dict(), str(folder / "model.safetensors"))
    transform = create_transform(**resolve_data_config({}, model=timm_model(f"local-dir:{folder}")))
    rng = np.random.default_rng(size)
    predictor = Predictor(net, TINY_NAMES, pre, device="cpu")
    for h, w in ((150, 211), (301, 97)):
        path = tmp_path / f"{h}x{w}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        theirs = transform(Image.open(path).convert("RGB"))
        ours = torch.from_numpy(normalise(predictor.prepare(path)[None], predictor.preprocess))[0]
        assert theirs.shape == ours.shape == (3, size, size)
        assert (theirs - ours).abs().max() <= 1.01 / 255 / min(pre.std)


def test_a_missing_hub_model_or_upload_is_one_sentence(tiny_export, tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match=r"local-dir:.*nowhere: no such folder"):
        resolve_model_source(f"local-dir:{tmp_path / 'nowhere'}")
    with pytest.raises(WeightsError, match=r"has no config.json: pass a folder written by twincar.export format=hf"):
        resolve_model_source(f"local-dir:{tiny_export.parent}")
    hub_cache(tmp_path, tiny_export.parent, "someone/other", monkeypatch)
    with pytest.raises(WeightsError, match=r"hf-hub:nobody/nothing: repository nobody/nothing is not in the local "
                                           r"Hugging Face cache \(HF_HUB_OFFLINE=1\)"):
        Predictor.load("hf-hub:nobody/nothing")
    with pytest.raises(ExportError, match="push_to_hub=me/cars needs format=hf"):
        export_model(tiny_export, "pth", tmp_path / "pth", push_to_hub="me/cars")
    with pytest.raises(ExportError, match=r"push_to_hub=me/cars: could not upload .* \(.*offline.*\); the export "
                                          r"itself is complete there"):
        export_model(tiny_export, "hf", tmp_path / "up", push_to_hub="me/cars")
    assert (tmp_path / "up" / "config.json").is_file()
    assert "hf-hub:me/cars" in (tmp_path / "up" / "README.md").read_text()


@pytest.mark.slow  # a resnet50: a few seconds
def test_original_twincars_pth_converts_in_one_command(tmp_path):
    """A bare torchvision-keyed resnet50 state dict with no card (the original project's file) + classes=."""
    import timm

    from twincar.data.classes import write_classes_txt

    torch.manual_seed(0)
    net = timm.create_model("resnet50", num_classes=len(TINY_NAMES))
    torch.save(net.state_dict(), tmp_path / "resnet50_twin_cars.pth")
    write_classes_txt(TINY_NAMES, tmp_path / "classes.txt")
    with pytest.raises(WeightsError, match="carries no class names: pass --classes"):
        export_model(tmp_path / "resnet50_twin_cars.pth", "hf", tmp_path / "no")
    export_model(tmp_path / "resnet50_twin_cars.pth", "hf", tmp_path / "hf", classes=tmp_path / "classes.txt")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["label_names"] == TINY_NAMES and config["pretrained_cfg"]["crop_mode"] == "squash"
    assert config["pretrained_cfg"]["input_size"] == [3, 224, 224] and config["pretrained_cfg"]["crop_pct"] == 1.0
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(timm_model(f"local-dir:{tmp_path / 'hf'}")(x), net.eval()(x))


def test_model_card_is_a_contract_in_strict_json(tmp_path):
    card = build_model_card(TINY_NAMES, Preprocess(image_size=224, eval_crop_pct=0.875), "resnet50",
                            metrics={"test/acc": 0.9, "test/acc_year_in_family": float("nan"), "test/nll": math.inf})
    path = write_model_card(tmp_path, card)

    def refuse(word):
        raise AssertionError(f"bare {word} in {path}")

    read = json.loads(path.read_text(), parse_constant=refuse)
    assert read["metrics"] == {"test/acc": 0.9, "test/acc_year_in_family": None, "test/nll": None}
    contract = read["input"]
    assert (contract["layout"], contract["dtype"], contract["channels"]) == ("NCHW", "float32", "RGB")
    assert contract["resize"] | {"rule": ""} == {"mode": "short_side", "short_side": 256, "interpolation": "bilinear",
                                                 "antialias": True, "rule": ""}
    assert contract["crop"]["size"] == [224, 224] and contract["mean"] == [0.485, 0.456, 0.406]
    assert "min(w, h) // s >= 256" in contract["decode"]["large_jpeg"] and "255" in contract["scale"]
    assert read["output"]["name"] == "logits" and read["output"]["shape"] == ["N", 6]


def test_training_val_transform_follows_the_reference_preprocessing(tiny_export, car_images, tmp_path):
    """Training's val transform (torchvision's resize on the decoded tensor: EvalImageTransform) stays within one
    grey level of the reference preprocessing every engine uses (PIL's resize: inference.preprocess.prepare), a
    large JPEG reduced by the same rule; and ``Prediction`` is one type."""
    from twincar import Prediction
    from twincar.data.images import load_rgb
    from twincar.data.transforms import EvalImageTransform, to_tensor
    from twincar.inference import results

    assert Prediction is results.Prediction
    rng = np.random.default_rng(1)
    big = tmp_path / "big.jpg"
    Image.fromarray(rng.integers(0, 255, (1200, 1700, 3), dtype=np.uint8)).resize((3400, 2400)).save(big, quality=90)
    for pre in (Preprocess(image_size=64), Preprocess(image_size=64, resize_mode="squash", eval_crop_pct=1.0)):
        predictor = Predictor.load(tiny_export, device="cpu", resize_mode=pre.resize_mode)
        assert predictor.preprocess.decode_min_side == pre.decode_min_side
        for path in [*car_images, big]:
            ours = predictor.prepare(path).astype(int)
            decoded = to_tensor(load_rgb(path, min_side=pre.decode_min_side))
            theirs = EvalImageTransform(pre)(decoded).permute(1, 2, 0).numpy().astype(int)
            assert ours.shape == theirs.shape == (64, 64, 3) and np.abs(ours - theirs).max() <= 1


ONNX_WITHOUT_TORCH = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
from twincar import Predictor
for tta in ('none', 'flip'):
    p = Predictor.load(sys.argv[1], device='cpu', tta=tta)
    for r in p.predict(sys.argv[2:], batch_size=2):
        print(tta, r.name, r.confidence, r.unknown_score, sep='|')
print('torch' in sys.modules, p.is_onnx, p.score, sep='|')
"""


def with_feature_statistics(model: Path, folder: Path) -> Path:
    """A copy of an exported model calibrated with the mahalanobis unknown score: statistics of made-up training
    features (512-d, as a ResNet-18's) beside it, named by its card."""
    from twincar.inference.features import fit_feature_stats
    from twincar.models.card import write_unknown_stats

    folder.mkdir(parents=True)
    for name in (model.name, "model_card.json", "classes.txt"):
        shutil.copy(model.with_name(name), folder / name)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 512))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    entry = write_unknown_stats(folder / model.name, fit_feature_stats(x, np.arange(48) % 6, 6).arrays())
    card = json.loads((folder / "model_card.json").read_text())
    card["calibration"] = {"temperature": 1.0, "score": "mahalanobis", "threshold": -1e9, "features": entry}
    write_model_card(folder, card)
    return folder / model.name


def test_predictor_load_onnx_is_the_torch_free_runtime(tiny_export, car_images, tmp_path):
    """``Predictor.load("model.onnx")`` predicts with torch unimportable, and gives the PyTorch engine's top-1 and
    probabilities (within float noise) on the same images, without and with flip TTA, and its feature unknown score
    (the export's features output, the statistics file copied beside it)."""
    tiny_export = with_feature_statistics(tiny_export, tmp_path / "calibrated")
    onnx = export_model(tiny_export, "onnx", tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.unknown.npz").is_file()
    assert json.loads((tmp_path / "onnx" / "model_card.json").read_text())["output"]["features"]["name"] == "features"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", ONNX_WITHOUT_TORCH, str(onnx), *map(str, car_images)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    *lines, last = proc.stdout.strip().splitlines()
    assert last == "False|True|mahalanobis"  # torch never imported; the ONNX engine ran, with the feature score
    for tta in ("none", "flip"):
        onnx_results = [line.split("|")[1:] for line in lines if line.startswith(f"{tta}|")]
        torch_results = Predictor.load(tiny_export, device="cpu", tta=tta).predict(car_images)
        assert [name for name, _, _ in onnx_results] == [r.name for r in torch_results]
        assert max(abs(float(confidence) - r.confidence)
                   for (_, confidence, _), r in zip(onnx_results, torch_results, strict=True)) <= 1e-4
        np.testing.assert_allclose([float(score) for _, _, score in onnx_results],
                                   [r.unknown_score for r in torch_results], rtol=1e-5, atol=1e-4)


# -- slow: a trained model, the embedded test images and large photos ------------------------------------
@pytest.fixture(scope="module")
def shipped(tmp_path_factory, data_dir):
    """The trained run's hf and ONNX exports, the images (embedded test set + large photos, one with an EXIF
    rotation) and twincar-predict's rows for them from the checkpoint (PyTorch, fp32)."""
    from twincar.predict import predict_files

    run = trained_run(tmp_path_factory, data_dir)
    ckpt = run / "checkpoints" / "last.ckpt"
    out = tmp_path_factory.mktemp("shipped")
    export_model(ckpt, "hf", out / "hf")
    onnx = export_model(ckpt, "onnx", out / "onnx")
    tests = sorted(data_dir.glob("synthetic/*/cars_test/*.jpg"))
    assert len(tests) >= 24
    large = []
    for i, src in enumerate(tests[:: max(1, len(tests) // 6)][:6]):
        im = Image.open(src).convert("RGB")
        size = (2400, 1600) if i % 2 else (1536, 2304)
        path = out / f"large_{i}.jpg"
        exif = Image.Exif()
        if i == 3:
            exif[0x0112] = 6  # stored rotated: shown after a 90 degree turn
        im.resize(size, Image.Resampling.BICUBIC).save(path, quality=92, exif=exif)
        large.append(path)
    images = [*tests, *large]
    predict_files(images, ckpt, output=out / "torch.csv", precision="fp32", device="cpu", topk=3, progress=False)
    return {"ckpt": ckpt, "hf": out / "hf", "onnx": onnx, "images": images, "out": out,
            "reference": read_rows(out / "torch.csv")}


def read_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_timm_alone_gives_twincar_predicts_answers(shipped):
    """A timm user: create_model("local-dir:...") + resolve_data_config + create_transform, nothing of TwinCar."""
    from timm.data import create_transform, resolve_data_config

    model = timm_model(f"local-dir:{shipped['hf']}")
    transform = create_transform(**resolve_data_config({}, model=model))
    names = model.pretrained_cfg["label_names"]
    with torch.inference_mode():
        batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in shipped["images"]])
        got = [names[i] for i in model(batch).argmax(1).tolist()]
    same = sum(g == r["class"] for g, r in zip(got, shipped["reference"], strict=True))
    assert same / len(got) >= 0.99, f"{same}/{len(got)}"


def card_only_client(model_path: str, image_path: str) -> str:
    """A client that knows nothing of TwinCar: numpy, PIL and onnxruntime, following model_card.json only."""
    import onnxruntime as ort

    card = json.loads(Path(model_path).with_name("model_card.json").read_text())
    spec = card["input"]
    im = Image.open(image_path)
    short = spec["resize"]["short_side"] if spec["resize"]["mode"] == "short_side" else spec["resize"]["size"][0]
    if im.format == "JPEG":  # the card's large_jpeg rule
        s = 1
        while s < 8 and min(im.size) // (s * 2) >= short:
            s *= 2
        if s > 1:
            im.draft("RGB", (math.ceil(im.size[0] / s), math.ceil(im.size[1] / s)))
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im).convert("RGB")
    if spec["resize"]["mode"] == "squash":
        im = im.resize(tuple(spec["resize"]["size"]), Image.Resampling.BILINEAR)
    else:
        w, h = im.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        im = im.resize(size, Image.Resampling.BILINEAR)
        size = spec["crop"]["size"][0]
        top, left = int(round((im.size[1] - size) / 2)), int(round((im.size[0] - size) / 2))
        im = im.crop((left, top, left + size, top + size))
    x = (np.asarray(im, np.float32) / 255 - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    (logits,) = session.run([card["output"]["name"]],
                            {session.get_inputs()[0].name: x.transpose(2, 0, 1)[None].astype(np.float32)})
    return card["class_names"][int(np.argmax(logits[0]))]


@pytest.mark.slow
def test_a_card_only_onnx_client_agrees_with_twincar_predict(shipped):
    got = [card_only_client(str(shipped["onnx"]), str(p)) for p in shipped["images"]]
    assert got == [r["class"] for r in shipped["reference"]]


BLOCK_TORCH = """
import sys, importlib.abc
at_start = set(sys.modules)  # the interpreter's own start-up (site hooks), not what predict imports
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'torchvision'):
            raise ImportError(f'{name} is blocked in this test')
sys.meta_path.insert(0, Block())
from twincar.predict import main
code = main(sys.argv[2:])
open(sys.argv[1], 'w').write('\\n'.join(sorted({m.split('.')[0] for m in set(sys.modules) - at_start})))
sys.exit(code)
"""


@pytest.mark.slow
def test_predict_on_onnx_runs_with_torch_unimportable(shipped):
    """The torch-free runtime: torch and torchvision cannot be imported, the CSV is the PyTorch path's (top-1 all
    equal, probabilities within 1e-3), and nothing outside requirements-runtime.txt (and onnxruntime's own
    dependencies) is imported."""
    from importlib.metadata import requires

    out, modules = shipped["out"] / "onnx.csv", shipped["out"] / "modules.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(modules), "--images", *map(str, shipped["images"]),
                           "--model", str(shipped["onnx"]), "--output", str(out), "--topk", "3", "--no-progress"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, reference = read_rows(out), shipped["reference"]
    assert [r["image"] for r in rows] == [r["image"] for r in reference]
    same = sum(r["class"] == e["class"] for r, e in zip(rows, reference, strict=True))
    assert same / len(rows) >= 0.999
    worst = max(abs(float(r["top1_prob"]) - float(e["top1_prob"])) for r, e in zip(rows, reference, strict=True))
    assert worst <= 1e-3
    lines = (REPO / "requirements-runtime.txt").read_text().splitlines()
    listed = [line.split(">=")[0].strip().lower() for line in lines if line.strip() and not line.startswith("#")]
    assert listed == ["numpy", "pillow", "onnxruntime"]
    deps = {r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower().replace("-", "_")
            for r in requires("onnxruntime") or [] if "extra ==" not in r}
    allowed = {"twincar", "numpy", "PIL", "onnxruntime", *deps, *sys.stdlib_module_names, "google"}  # google: protobuf
    imported = set(modules.read_text().split())
    assert "torch" not in imported and "torchvision" not in imported
    assert {m for m in imported if m.lstrip("_") not in allowed and m not in allowed} == set()


@pytest.mark.slow
def test_the_wheel_carries_every_config(tmp_path):
    """pip builds the wheel offline (the installed setuptools, no isolation) from a copy of the source (the build
    leaves nothing in the checkout); every file of twincar/conf/ is in it."""
    source = tmp_path / "src"
    shutil.copytree(REPO / "twincar", source / "twincar", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("twincar-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = REPO / "twincar" / "conf"
    expected = {p.relative_to(REPO).as_posix() for p in conf.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
    assert "twincar/conf/hydra/launcher/slurm.yaml" in expected
    assert expected - names == set()


SPACE_WITHOUT_TORCH = BLOCK_TORCH.split("from twincar.predict")[0] + """
import importlib.util
spec = importlib.util.spec_from_file_location('space_app', sys.argv[1])
app = importlib.util.module_from_spec(spec)
spec.loader.exec_module(app)
from twincar.demo import Answerer
predictor = app.load_predictor(sys.argv[2])
demo = app.create_app(sys.argv[2])
cam = next(b for b in demo.blocks.values() if getattr(b, 'elem_id', None) == 'gradcam')
make, model, year, confidence, top5, overlay, message = Answerer(predictor)(sys.argv[3], True)
print(f"{type(predictor).__name__}:{predictor.engine.kind}", make, model, year, cam.visible, overlay is None,
      'torch' in sys.modules, sep='|')
"""


@pytest.mark.slow
def test_the_space_serves_the_onnx_export_without_torch(shipped, tmp_path):
    """The Space folder holds model.onnx + model_card.json; with torch unimportable it answers as twincar-predict
    does, and offers no Grad-CAM (that needs PyTorch weights)."""
    folder = tmp_path / "space"
    folder.mkdir()
    for name in ("model.onnx", "model_card.json"):
        shutil.copy(shipped["onnx"].with_name(name), folder / name)
    requirements = (REPO / "space" / "requirements.txt").read_text().lower()
    assert "torch" not in requirements.replace("# ", "#").split("#")[0] and "onnxruntime" in requirements
    front = yaml.safe_load((REPO / "space" / "README.md").read_text().split("---\n")[1])
    assert str(front["python_version"]).startswith("3.")
    env = {**os.environ, "PYTHONPATH": str(REPO), "GRADIO_ANALYTICS_ENABLED": "False"}
    image, reference = shipped["images"][0], shipped["reference"][0]
    proc = subprocess.run([sys.executable, "-c", SPACE_WITHOUT_TORCH, str(REPO / "space" / "app.py"), str(folder),
                           str(image)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kind, make, model, year, cam_visible, no_overlay, torch_loaded = proc.stdout.strip().splitlines()[-1].split("|")
    assert kind == "Predictor:onnx"
    assert (make, model, year) == (reference["make"], reference["model"], reference["year"])
    assert (cam_visible, no_overlay, torch_loaded) == ("False", "True", "False")
