"""The web demo as a user meets it: a local server, its API (gradio_client) and the page in headless Chromium."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from tests.conftest import REPO, TINY_NAMES
from twincar import Predictor

pytest.importorskip("gradio", reason="the demo extra is not installed: pip install 'twincar[demo]'")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_export, car_images):
    """The demo app over the tiny model, served on 127.0.0.1 (analytics off), with one example photo."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    from twincar.demo import build_app, launch

    predictor = Predictor.load(tiny_export, device="cpu")
    app = build_app(predictor, examples=[str(car_images[0])], max_upload_mb=1)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, max_upload_mb=1, block=False)
    yield f"http://127.0.0.1:{port}/", predictor
    app.close()


@pytest.fixture(scope="module")
def open_set_server(tiny_export, car_images, tmp_path_factory):
    """The demo over a copy of the tiny model whose calibrated threshold lies between its scores of the photos (the
    lowest-scoring one is not one of its cars), with a neighbour index of the photos in index/ beside it."""
    from twincar.demo import build_app, launch
    from twincar.evaluation.calibration import unknown_scores
    from twincar.evaluation.neighbours import NeighbourIndex, find_index
    from twincar.models.loading import write_calibration

    folder = tmp_path_factory.mktemp("open_set_model")
    for name in ("model.pth", "model_card.json", "classes.txt"):
        shutil.copy(tiny_export.with_name(name), folder / name)
    plain = Predictor.load(tiny_export, device="cpu")
    scores = unknown_scores(torch.cat([torch.from_numpy(plain.outputs(plain.prepare(p)[None])[0]) for p in car_images]))
    write_calibration(folder / "model.pth", {"temperature": 1.0, "threshold": float(scores.median())})
    NeighbourIndex(torch.from_numpy(plain.embed(car_images)), torch.tensor([0, 1, 2]), [str(p) for p in car_images],
                   plain.class_names, "torch").save(folder / "index")
    predictor = Predictor.load(folder / "model.pth", device="cpu")
    index = find_index(folder / "model.pth")  # found beside the model, as the demo's command line finds it
    app = build_app(predictor, index=index)
    port = free_port()
    launch(app, host="127.0.0.1", port=port, block=False)
    yield f"http://127.0.0.1:{port}/", predictor, index, car_images[int(scores.argmin())]
    app.close()


def test_the_gallery_shows_the_nearest_training_cars_with_their_class_and_similarity(open_set_server, car_images,
                                                                                      tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    from twincar.demo import thumbnail
    from twincar.evaluation.neighbours import find_index

    url, predictor, index, unknown = open_set_server
    client = Client(url, verbose=False)
    for image in car_images[:2]:
        *_, gallery, message = client.predict(handle_file(str(image)), False, api_name="/predict")
        expected = index.search(predictor.embed(image), 3)[0]
        assert [g["caption"] for g in gallery] == [f"{name} ({sim:.2f})" for _, name, sim in expected]
        assert expected[0][0] == str(image) and gallery[0]["caption"].endswith("(1.00)")  # itself, first
        with Image.open(gallery[0]["image"]) as thumb, Image.open(image) as original:
            assert thumb.size == original.size  # small photos are shown as they are (never enlarged)
        assert message.startswith("### Not one of") == (image == unknown)
    *_, gallery, message = client.predict(handle_file(str(car_images[0])), True, api_name="/predict")  # Grad-CAM on
    assert len(gallery) == 3
    big = tmp_path / "big.jpg"
    Image.new("RGB", (600, 400), "red").save(big)
    assert thumbnail(str(big)).shape == (128, 192, 3) and thumbnail(str(tmp_path / "gone.jpg")) is None
    assert find_index(big) is None  # no index/ beside it: no gallery


def indexed_copy(car_images, folder: Path, side: int):
    """An index with thumbnails (longer side ``side``) of copies of the photos in ``folder``, whose files are then
    removed, as on a machine that has the index but not the training images; the copies' paths."""
    from twincar.data.formats.common import Sample
    from twincar.evaluation.neighbours import build_index

    train = folder / "train"
    train.mkdir(parents=True)
    copies = [Path(shutil.copy(p, train / f"{i}{p.suffix}")) for i, p in enumerate(car_images)]
    predictor = Predictor.load(folder / "model.pth", device="cpu")
    build_index(predictor, [Sample(p, i) for i, p in enumerate(copies)], thumbnails=side).save(folder / "index")
    shutil.rmtree(train)
    return copies


def test_an_index_keeps_thumbnails_so_the_gallery_needs_no_training_images(tiny_export, car_images, tmp_path,
                                                                          caplog):
    from PIL import Image

    from twincar.demo import Answerer
    from twincar.evaluation.neighbours import INDEX_THUMBNAILS, NeighbourIndex, find_index

    shutil.copy(tiny_export, tmp_path / "model.pth")
    shutil.copy(tiny_export.with_name("model_card.json"), tmp_path / "model_card.json")
    copies = indexed_copy(car_images, tmp_path, side=32)
    index = find_index(tmp_path / "model.pth")
    with Image.open(car_images[0]) as image:
        w, h = image.size  # 90 x 60: the thumbnail's longer side is 32
    assert index.thumbnail(str(copies[0])).shape == (round(h * 32 / w), 32, 3)
    *_, gallery, message = Answerer(Predictor.load(tmp_path / "model.pth", device="cpu"), index=index)(
        str(car_images[0]))
    assert len(gallery) == 3 and gallery[0][1].endswith("(1.00)")  # the photo's own copy first, from the index
    assert gallery[0][0].shape == index.thumbnail(str(copies[0])).shape

    index.paths.reverse()  # thumbnails of other images than the index's are not shown under the wrong names
    index.thumbnails = None
    index.save(tmp_path / "other")
    (tmp_path / "index" / INDEX_THUMBNAILS).replace(tmp_path / "other" / INDEX_THUMBNAILS)
    assert NeighbourIndex.load(tmp_path / "other").thumbnails is None
    assert "is of other images than its index" in caplog.text


def test_client_prediction_equals_the_predictor(server, car_images, tmp_path, capfd):
    from gradio_client import Client, handle_file

    url, predictor = server
    client = Client(url, verbose=False)
    for image in car_images[:2]:
        make, model, year, confidence, top5, overlay, message = client.predict(
            handle_file(str(image)), False, api_name="/predict")
        ref = predictor.predict(image)
        assert (make, model, year) == (ref.make, ref.model, str(ref.year)) and ref.name in message
        assert confidence == f"{ref.confidence:.1%}" and overlay is None
        assert [(c["label"], pytest.approx(c["confidence"], abs=1e-6)) for c in top5["confidences"]] == ref.topk
    # a non-image upload: a message on the page, empty fields, no server traceback
    (tmp_path / "notes.jpg").write_text("not a photo")
    make, *_, message = client.predict(handle_file(str(tmp_path / "notes.jpg")), False, api_name="/predict")
    assert make == "" and "Cannot use this file" in message and "notes.jpg: not an image" in message
    assert str(tmp_path) not in message  # no server paths shown
    assert "Traceback" not in capfd.readouterr().err


def test_gradcam_toggle_returns_an_overlay_of_the_input_size(server, car_images):
    from gradio_client import Client, handle_file
    from PIL import Image

    url, predictor = server
    make, *_, overlay, message = Client(url, verbose=False).predict(
        handle_file(str(car_images[0])), True, api_name="/predict")
    assert make == predictor.predict(car_images[0]).make
    assert Image.open(overlay).size == (256, 256)  # the 64x64 network input's map, enlarged for display


def test_oversized_upload_and_empty_input_get_a_message(tiny_export, tmp_path):
    from twincar.demo import Answerer

    answer = Answerer(Predictor.load(tiny_export, device="cpu"), max_upload_mb=0.001)
    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * 5000)
    assert answer(str(big))[-1] == "**big.png** is 0.0 MB: the limit is 0 MB."
    assert answer(None)[0] == "" and "Upload a car photo" in answer(None)[-1]


def test_space_app_runs_from_the_model_file_in_its_folder(tiny_export, car_images, tmp_path):
    from twincar.demo import find_model_file

    folder = tmp_path / "space"
    (folder / "examples").mkdir(parents=True)
    for name in ("model.pth", "model_card.json"):
        shutil.copy(tiny_export.with_name(name), folder / name)
    shutil.copy(car_images[0], folder / "examples" / "a.jpg")
    assert find_model_file(folder) == folder / "model.pth"
    spec = importlib.util.spec_from_file_location("space_app", REPO / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = module.create_app(folder)
    assert app.title == "TwinCar" and not galleries(app)
    indexed_copy(car_images, folder, side=64)  # index/ beside the model: the nearest training cars are shown
    assert galleries(module.create_app(folder)) == ["neighbours"]
    front = (REPO / "space" / "README.md").read_text().split("---")[1]
    assert "sdk: gradio" in front and "app_file: app.py" in front


def galleries(app) -> list[str]:
    """The ids of the app's galleries."""
    import gradio as gr

    return [b.elem_id for b in app.blocks.values() if isinstance(b, gr.Gallery)]


def test_demo_cli_says_what_is_missing(tmp_path, capsys):
    from twincar.demo import main

    assert main(["--model", str(tmp_path / "nope.pth")]) == 1
    assert "nope.pth does not exist" in capsys.readouterr().err


@pytest.fixture()
def browser(tmp_path):
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(f"headless browser test needs Debian chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER})")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the demo extra)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1100",
                f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


@pytest.mark.slow
def test_browser_upload_shows_make_model_year_offline(server, browser, car_images, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, predictor = server
    browser.get(url)
    wait = WebDriverWait(browser, 90)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]"))
    upload.send_keys(str(car_images[1]))

    def field(name: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{name} textarea, #{name} input").get_attribute("value")

    wait.until(lambda d: field("make") != "")
    ref = predictor.predict(car_images[1])
    assert (field("make"), field("model"), field("year")) == (ref.make, ref.model, str(ref.year))
    assert field("confidence") == f"{ref.confidence:.1%}"
    top5 = browser.find_element(By.ID, "top5").text
    assert ref.name in top5 and sum(name in top5 for name in TINY_NAMES) == 5
    # everything the page loaded came from the demo server itself: it renders offline, no CDN fonts or scripts
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    foreign = [u for u in loaded if urlparse(u).scheme in ("http", "https") and urlparse(u).hostname != "127.0.0.1"]
    assert loaded and not foreign
    browser.find_element(By.CSS_SELECTOR, "#gradcam input[type=checkbox]").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000


@pytest.mark.slow
def test_browser_says_not_one_of_the_cars_it_knows_for_an_image_below_the_threshold(open_set_server, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, predictor, _, unknown = open_set_server
    assert not predictor.predict(unknown).known  # the fixture's threshold puts this photo below it
    browser.get(url)
    wait = WebDriverWait(browser, 90)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#photo input[type=file]")).send_keys(str(unknown))
    wait.until(lambda d: "Not one of" in d.find_element(By.ID, "message").text)
    assert "Not one of the 6 cars I know" in browser.find_element(By.TAG_NAME, "body").text
    assert wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#neighbours img")) == 3)
