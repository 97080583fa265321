"""Strange files never lose results: each bad input is read right or named in one sentence, and nothing else
is lost. One section per kind of input: images, globs and folders, class lists, arguments and outputs (each
bad one is refused in one sentence before any work)."""

from __future__ import annotations

import csv
import errno
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import TINY_NAMES, run_cli
from twincar import Predictor
from twincar.data.classes import ClassListError, read_class_names, read_classes_txt
from twincar.data.formats import Sample
from twincar.data.images import (
    IMAGE_EXTENSIONS,
    ImageReadError,
    NoImagesError,
    decode_rgb_bytes,
    find_images,
    load_rgb,
    read_header,
)
from twincar.evaluation.loop import collect_logits
from twincar.models import WeightsError


def one_sentence(message: str, path: Path | str) -> bool:
    """A user's message: one line that names the file."""
    return "\n" not in message and str(path) in message and "Traceback" not in message


def gradient(h: int = 32, w: int = 48) -> np.ndarray:
    """A smooth (h, w, 3) uint8 RGB picture: lossy formats keep it close."""
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def png16(path: Path, pixels: np.ndarray) -> Path:
    """A 16-bit PNG (gray, gray+alpha, RGB or RGBA by the channel count) of ``pixels`` (uint16), written by hand:
    PIL writes only 16-bit grayscale."""
    h, w = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path




def animated_gif(path: Path, first: np.ndarray) -> Path:
    frames = [Image.fromarray(first).convert("P"), *(Image.fromarray(255 - first).convert("P") for _ in range(2))]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return path


# -- images ------------------------------------------------------------------------------------------
def _mode_image(mode: str) -> Image.Image:
    rgb = Image.fromarray(gradient())
    if mode == "I;16":
        return Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    return rgb.convert(mode)


def _expected_rgb(image: Image.Image) -> np.ndarray:
    """The RGB pixels a decoder should give for ``image`` (16-bit: scaled to 8 bits)."""
    if image.mode == "I;16":
        gray = ((np.asarray(image).astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return np.stack([gray] * 3, -1)
    return np.asarray(image.convert("RGB"))


# every extension in RGB; every mode in a format that stores it (CMYK: JPEG and TIFF; 16-bit: PNG and TIFF)
CASES = [(ext, "RGB") for ext in IMAGE_EXTENSIONS] + [
    (".png", "L"), (".png", "RGBA"), (".png", "P"), (".png", "I;16"), (".jpg", "L"), (".jpg", "CMYK"),
    (".bmp", "L"), (".bmp", "P"), (".bmp", "RGBA"), (".webp", "RGBA"), (".gif", "P"), (".gif", "L"),
    (".tif", "L"), (".tif", "RGBA"), (".tif", "P"), (".tif", "CMYK"), (".tiff", "I;16"),
]
LOSSY = (".jpg", ".jpeg")


@pytest.mark.parametrize(("ext", "mode"), CASES, ids=[f"{e[1:]}-{m}" for e, m in CASES])
def test_every_extension_and_mode_decodes_to_uint8_rgb_close_to_the_original(tmp_path, ext, mode):
    image = _mode_image(mode)
    path = tmp_path / f"image{ext}"
    image.save(path, **({"lossless": True} if ext == ".webp" else {}))
    expected = _expected_rgb(image).astype(int)
    for decoded in (load_rgb(path), decode_rgb_bytes(path.read_bytes(), str(path)), load_rgb(path, min_side=64)):
        assert decoded.dtype == np.uint8 and decoded.shape == (32, 48, 3)
        diff = np.abs(decoded.astype(int) - expected)
        if ext in LOSSY:
            assert diff.mean() < 4 and diff.max() < 64
        elif ext == ".gif" and mode != "P":  # GIF stores a palette: L and RGB are quantised
            assert diff.mean() < 12
        else:
            assert diff.max() <= 1
    reduced = load_rgb(path, min_side=8)  # the reduced-size path: a JPEG at 1/4 size, any other format in full
    assert reduced.dtype == np.uint8 and reduced.shape == ((8, 12, 3) if ext in LOSSY else (32, 48, 3))


def test_a_16bit_png_decodes_to_its_8bit_pixels_and_predicts_like_them(tiny_export, tmp_path):
    p = Predictor.load(tiny_export, device="cpu")
    rgb = gradient(64, 80)
    Image.fromarray(rgb).save(tmp_path / "rgb8.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray8.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # PIL mode I;16
    assert read_header(tmp_path / "gray16.png").mode == "I;16"
    png16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)  # 48-bit RGB
    alpha = np.full(rgb.shape[:2] + (1,), 255, np.uint8)
    png16(tmp_path / "rgba16.png", np.concatenate([rgb, alpha], -1).astype(np.uint16) * 257)  # 64-bit RGBA
    for name, eight in (("gray16", "gray8"), ("rgb16", "rgb8"), ("rgba16", "rgb8")):
        sixteen, reference = tmp_path / f"{name}.png", load_rgb(tmp_path / f"{eight}.png")
        assert np.array_equal(load_rgb(sixteen), reference), name
        assert np.array_equal(decode_rgb_bytes(sixteen.read_bytes(), name), reference), name
        assert np.array_equal(load_rgb(sixteen, min_side=8), reference), name
        assert p.prepare(sixteen).dtype == np.uint8
        got, want = p.predict(sixteen, topk=6), p.predict(tmp_path / f"{eight}.png", topk=6)
        assert got.ok and dict(got.topk) == pytest.approx(dict(want.topk), abs=1e-5), name


def test_a_16bit_pil_image_in_memory_is_scaled_not_clipped(tiny_export):
    p = Predictor.load(tiny_export, device="cpu")
    gray = gradient()[..., 0]
    got = p.predict(Image.fromarray(gray.astype(np.uint16) * 257), topk=6)
    want = p.predict(Image.fromarray(gray), topk=6)
    assert dict(got.topk) == pytest.approx(dict(want.topk), abs=1e-5)


def test_animated_gif_webp_and_multipage_tiff_use_their_first_frame(tmp_path):
    first = gradient()
    frames = [Image.fromarray(first), Image.fromarray(255 - first), Image.fromarray(first[::-1].copy())]
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "pages.tif", save_all=True, append_images=frames[1:])
    animated_gif(tmp_path / "anim.gif", first)
    assert read_header(tmp_path / "anim.gif").animated
    for name in ("anim.gif", "anim.webp", "pages.tif"):
        path = tmp_path / name
        with Image.open(path) as im:
            expected = np.asarray(im.convert("RGB"))  # frame 0
        for decoded in (load_rgb(path), decode_rgb_bytes(path.read_bytes(), name)):
            assert decoded.shape == (32, 48, 3) and np.array_equal(decoded, expected), name


def test_a_tiff_follows_its_exif_orientation_like_a_jpeg(tmp_path):
    path = tmp_path / "rotated.tif"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(gradient()).save(path, exif=exif)
    assert read_header(path).orientation == 6
    assert load_rgb(path).shape == (48, 32, 3)
    assert np.array_equal(load_rgb(path), np.rot90(gradient(), -1, (0, 1)))


@pytest.fixture()
def mixed_images(tmp_path, car_images) -> tuple[list[Path], set[Path]]:
    """Good images (JPEG, PNG, grayscale, a 16-bit PNG, an animated GIF, a BMP, a TIFF) among bad ones
    (a truncated JPEG, a 0-byte file, a text file named .jpg). Returns (all in order, the bad ones)."""
    rgb = gradient()
    d = tmp_path / "mixed"
    d.mkdir()
    png16(d / "deep.png", rgb.astype(np.uint16) * 257)
    animated_gif(d / "moving.gif", rgb)
    Image.fromarray(rgb).save(d / "plain.bmp")
    Image.fromarray(rgb).save(d / "plain.tif")
    jpeg = car_images[0].read_bytes()
    (d / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.jpg").write_text("not an image")
    bad = {d / "truncated.jpg", d / "empty.jpg", d / "notes.jpg"}
    images = [car_images[0], d / "deep.png", d / "truncated.jpg", car_images[1], d / "moving.gif", d / "empty.jpg",
              d / "plain.bmp", d / "notes.jpg", d / "plain.tif", car_images[2]]
    return images, bad


BAD_WORDS = {"truncated.jpg": "truncated", "empty.jpg": "empty (0 bytes)", "notes.jpg": "not an image"}


def test_one_bad_image_never_ends_a_predict_run(tiny_export, mixed_images):
    images, bad = mixed_images
    p = Predictor.load(tiny_export, device="cpu")
    results = p.predict(images, batch_size=3, topk=6)
    assert [r.source for r in results] == [str(i) for i in images]  # one row each, in order
    for path, r in zip(images, results, strict=True):
        if path in bad:
            assert not r.ok and one_sentence(r.error, path) and BAD_WORDS[path.name] in r.error
            assert r.to_row()["class"] == "" and r.to_row()["confidence"] == ""
        else:
            alone = p.predict(path, topk=6)
            assert r.ok and r.name == alone.name and dict(r.topk) == pytest.approx(dict(alone.topk), abs=1e-5)


def test_one_bad_image_never_ends_an_explain_run(tiny_export, mixed_images, tmp_path):
    from twincar.explain import explain_files
    from twincar.gradcam.explainer import Explainer

    images, bad = mixed_images
    p = Predictor.load(tiny_export, device="cpu")
    explainer = Explainer(p, faithfulness=False)
    results = explain_files(explainer, images, tmp_path / "explain", batch_size=4)  # Explainer.explain inside
    assert len(results) == len(images)
    for path, e in zip(images, results, strict=True):
        assert e.ok == (path not in bad)
        assert one_sentence(e.prediction.error, path) if path in bad else e.cam.shape == (64, 64)
    with (tmp_path / "explain" / "explain.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"] for r in rows] == [str(i) for i in images]
    assert [r["path"] for r in rows if r["error"]] == [str(i) for i in images if i in bad]
    assert all(r["overlay"] for r in rows if not r["error"])


def test_one_bad_image_never_ends_an_eval_run(tiny_export, mixed_images):
    images, bad = mixed_images
    p = Predictor.load(tiny_export, device="cpu")
    out = collect_logits(p, [Sample(path, i % 6) for i, path in enumerate(images)], batch_size=3, progress=False)
    assert [s.path for s in out.samples] == [i for i in images if i not in bad]
    assert sorted(name for name, _ in out.skipped) == sorted(str(b) for b in bad)
    assert all(one_sentence(why, name) for name, why in out.skipped)
    alone = torch.cat([torch.from_numpy(p.logits(p.prepare(s.path)[None])) for s in out.samples])
    assert torch.allclose(out.logits.softmax(1), alone.softmax(1), atol=1e-5)


def test_a_missing_file_a_symlink_loop_and_no_permission_are_named_as_such(tiny_export, tmp_path, monkeypatch,
                                                                            car_images):
    (tmp_path / "loop.jpg").symlink_to("loop.jpg")
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(car_images[0].read_bytes())
    cases = {tmp_path / "gone.jpg": "no such file", tmp_path / "loop.jpg": "a symlink loop",
             locked: "permission denied", tmp_path: "a folder, not an image file"}
    real_open = Image.open

    def deny(fp, *args, **kwargs):  # tests run as root here, where chmod 000 still reads
        if str(fp) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", deny)
    for path, words in cases.items():
        with pytest.raises(ImageReadError) as info:
            load_rgb(path)
        assert str(info.value) == f"cannot read image {path}: {words}"
    assert find_images([locked]) == [locked]  # a file named directly is kept: it gets its own error row
    denied, good = Predictor.load(tiny_export, device="cpu").predict([locked, car_images[0]])
    assert denied.error == f"cannot read image {locked}: permission denied" and good.ok


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its permissions")
def test_a_file_without_read_permission_says_permission_denied(tmp_path, car_images):
    locked = tmp_path / "locked.jpg"
    locked.write_bytes(car_images[0].read_bytes())
    locked.chmod(0)
    with pytest.raises(ImageReadError, match="permission denied"):
        load_rgb(locked)


def test_a_symlink_loop_given_as_images_says_so(tmp_path):
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(NoImagesError) as info:
        find_images([tmp_path / "loop"])
    assert "a symlink loop" in str(info.value) and one_sentence(str(info.value), tmp_path / "loop")
    (tmp_path / "dangling.jpg").symlink_to("nowhere.jpg")
    with pytest.raises(NoImagesError, match="a broken symlink"):
        find_images([tmp_path / "dangling.jpg"])


# -- globs and folders -------------------------------------------------------------------------------
@pytest.fixture()
def looped_folder(tmp_path, car_images) -> tuple[Path, list[Path]]:
    """DIR with two images (one in a subfolder), a link to itself, a link to its parent and one from its
    subfolder back up, a link to one of its files and a symlink loop named .jpg. Returns (DIR, real files)."""
    d = tmp_path / "DIR"
    (d / "sub").mkdir(parents=True)
    files = [d / "a.jpg", d / "sub" / "b.jpg"]
    for f in files:
        f.write_bytes(car_images[0].read_bytes())
    (d / "self").symlink_to(".")
    (d / "parent").symlink_to("..")
    (d / "sub" / "up").symlink_to("..")
    (d / "also_a.jpg").symlink_to("a.jpg")
    (d / "loop.jpg").symlink_to("loop.jpg")
    return d, files


@pytest.mark.timeout(30)
@pytest.mark.parametrize("spelling", ["{d}/**/*.jpg", "{d}", "{d}/*.jpg", "{d}/**"])
def test_globs_and_folders_never_follow_folder_links_nor_count_a_file_twice(looped_folder, spelling):
    d, files = looped_folder
    start = time.monotonic()
    found = find_images([spelling.format(d=d)])
    assert time.monotonic() - start < 5
    wanted = files[:1] if spelling == "{d}/*.jpg" else files
    assert found == wanted  # a.jpg once (also_a.jpg is the same file), nothing through self/, parent/ or up/


def test_the_same_file_spelled_twice_counts_once_as_first_spelled(looped_folder, monkeypatch):
    d, files = looped_folder
    spellings = [d / "also_a.jpg", f"{d}/./a.jpg", d / "self" / "a.jpg", d / "a.jpg", f"{d}/sub/../a.jpg"]
    assert find_images(spellings) == [d / "also_a.jpg"]  # a file symlink named directly is read
    assert find_images([d, d / "a.jpg"]) == files
    monkeypatch.chdir(d)
    assert find_images(["**/*.jpg", "a.jpg"]) == [Path("a.jpg"), Path("sub/b.jpg")]


def test_bmp_and_tiff_in_a_folder_are_collected_and_predicted(tiny_export, tmp_path):
    rgb = gradient()
    for ext in (".bmp", ".tif", ".tiff", ".png"):
        Image.fromarray(rgb).save(tmp_path / f"car{ext}")
    found = find_images([tmp_path])
    assert sorted(p.suffix for p in found) == [".bmp", ".png", ".tif", ".tiff"]
    results = Predictor.load(tiny_export, device="cpu").predict(found, topk=6)
    assert all(r.ok for r in results)
    assert all(dict(r.topk) == pytest.approx(dict(results[0].topk), abs=1e-5) for r in results)


# -- class lists -------------------------------------------------------------------------------------
@pytest.fixture()
def bare_pth(tiny_export, tmp_path) -> Path:
    """The tiny model as a bare state dict: no model card, no classes.txt beside it."""
    bare = tmp_path / "bare" / "model.pth"
    bare.parent.mkdir()
    bare.write_bytes(tiny_export.read_bytes())
    return bare


def test_a_utf8_bom_is_not_part_of_the_first_class_name(bare_pth, tmp_path, car_images):
    txt = tmp_path / "classes.txt"
    txt.write_bytes("\n".join(TINY_NAMES).encode("utf-8-sig"))
    table = tmp_path / "classes.csv"
    table.write_bytes(("name\n" + "\n".join(TINY_NAMES)).encode("utf-8-sig"))
    assert read_classes_txt(txt) == TINY_NAMES and read_class_names(table) == TINY_NAMES
    p = Predictor.load(bare_pth, classes=txt, architecture="resnet18", device="cpu")
    assert p.class_names == TINY_NAMES and p.parsed[0].make == "Audi"
    r = p.predict(car_images[0], topk=6)
    assert not any(name.startswith("\ufeff") for name, _ in r.topk) and "\ufeff" not in r.make


def test_a_class_named_twice_is_one_sentence_naming_it_and_its_lines(bare_pth, tmp_path):
    names = [*TINY_NAMES[:3], "audi  s4 sedan 2012", *TINY_NAMES[4:]]  # line 4 is line 1 again (name_key)
    txt = tmp_path / "classes.txt"
    txt.write_text("\n".join(names) + "\n", encoding="utf-8")
    message = f"{txt}: 'Audi S4 Sedan 2012' is on lines 1 and 4: every class needs its own name"
    with pytest.raises(ClassListError) as info:
        read_classes_txt(txt)
    assert str(info.value) == message
    with pytest.raises(WeightsError) as info:
        Predictor.load(bare_pth, classes=txt, architecture="resnet18", device="cpu")
    assert str(info.value) == message and one_sentence(message, txt)
    table = tmp_path / "classes.csv"
    table.write_text("label,name\n" + "".join(f"{i},{n}\n" for i, n in enumerate(names)), encoding="utf-8")
    with pytest.raises(ClassListError, match=r"classes.csv: 'Audi S4 Sedan 2012' is on lines 2 and 5: every"):
        read_class_names(table)


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
    import twincar.inference.predictor
    from twincar.predict import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(twincar.inference.predictor.Predictor, "load", no_load)
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
@pytest.mark.slow  # two subprocesses importing torch: about 10 s on 2 cores
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


@pytest.mark.slow  # a subprocess importing torch and Hydra: about 6 s on 2 cores
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
    from twincar.training.steps import build_model

    cfg = OmegaConf.create({"model": {"name": "resnet18"}, "optimizer": {"name": "adam", "lr": 1e-3},
                            "scheduler": {"name": "none"}})
    dm = CarsDataModule(root=str(small_root), image_size=7)
    with pytest.raises(TwinCarError, match="^data.image_size=7 is smaller than resnet18 takes: its features are 32x "
                                           "smaller than the input, so give at least 32 pixels$"):
        build_model(cfg, dm)


def test_a_user_error_wrapped_by_hydra_instantiate_is_still_one_sentence(caplog):
    """hydra.utils.instantiate wraps the data module's own error (an old run config's data.cache=true) in its
    InstantiationException: the entry point still logs our sentence and exits 1, and any other error stays an
    error."""
    import logging

    from hydra.errors import InstantiationException

    from twincar.errors import TwinCarError, exit_on_user_error

    log = logging.getLogger("twincar.test")
    with pytest.raises(SystemExit) as exited, caplog.at_level(logging.ERROR):
        with exit_on_user_error(log):
            try:
                raise TwinCarError("data.cache=true was removed: use data.pipeline=cache")
            except TwinCarError as e:
                raise InstantiationException("Error in call to target 'CarsDataModule'") from e
    assert exited.value.code == 1
    assert caplog.messages == ["data.cache=true was removed: use data.pipeline=cache"]
    with pytest.raises(InstantiationException):
        with exit_on_user_error(log):
            raise InstantiationException("Error in call to target 'CarsDataModule': not ours")
