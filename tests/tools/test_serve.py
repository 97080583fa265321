"""The HTTP server (python -m twincar.serve): a real LitServe server on 127.0.0.1, started and stopped here, answers
as twincar-predict does, batches concurrent clients, refuses bad requests in one sentence and keeps serving; the
ONNX server runs with torch unimportable."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import TINY_NAMES

httpx = pytest.importorskip("httpx")
pytest.importorskip("litserve")

REPO = Path(__file__).resolve().parents[2]
MAX_QUEUE = 16
TIMEOUT = 30  # seconds: every request is bounded


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m twincar.serve`` in its own process group on a free port; :meth:`ready` waits for /health."""

    def __init__(self, model: Path, log: Path, *args: str, pythonpath: Sequence = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([*map(str, pythonpath), str(REPO)])}
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "twincar.serve", "--model", str(model), "--port", str(self.port),
                 "--log-level", "warning", *args], env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)

    def ready(self) -> Server:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the server exited: {self.log.read_text()[-3000:]}"
            try:
                if self.client.get("/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the server did not become healthy: {self.log.read_text()[-3000:]}")

    def predict(self, **kwargs) -> httpx.Response:
        return self.client.post("/predict", **kwargs)

    def stop(self) -> None:
        """SIGTERM (LitServe's graceful shutdown, as docker stop asks), then whatever is left of its process group
        is killed."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)


BLOCKED = "raise ImportError('{name} is blocked in this test')\n"


@pytest.fixture(scope="module")
def servers(tiny_export, tmp_path_factory):
    """Two servers for the whole module, started side by side: ``torch`` on the tiny PyTorch export (every request
    test), and ``onnx`` on its ONNX export with torch and torchvision unimportable in every process and a threshold
    that rejects every image (``--unknown 1e6``)."""
    from twincar.export import export_model

    tmp = tmp_path_factory.mktemp("serve")
    started = [Server(tiny_export, tmp / "torch.log", "--precision", "fp32", "--max-batch-size", "8",
                      "--batch-timeout", "0.05", "--max-body-mb", "1", "--max-queue", str(MAX_QUEUE))]
    try:
        onnx = export_model(tiny_export, "onnx", tmp / "onnx")  # while the first one starts
        for name in ("torch", "torchvision"):
            (tmp / "block" / name).mkdir(parents=True)
            (tmp / "block" / name / "__init__.py").write_text(BLOCKED.format(name=name))
        started.append(Server(onnx, tmp / "onnx.log", "--unknown", "1e6", pythonpath=[tmp / "block"]))
        yield {"torch": started[0].ready(), "onnx": started[1].ready(), "onnx_model": onnx}
    finally:
        for s in started:
            s.stop()


@pytest.fixture(scope="module")
def server(servers) -> Server:
    return servers["torch"]


def jpeg_bytes(seed: int = 0, size=(90, 60)) -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
        out, "JPEG", quality=90)
    return out.getvalue()


def predict_records(images, model, tmp_path, *args) -> list[dict]:
    """twincar-predict's JSON records of ``images``."""
    from twincar.predict import main

    out = tmp_path / "predict.json"
    assert main(["--images", *map(str, images), "--model", str(model), "--format", "json", "-o", str(out),
                 "--no-progress", *args]) == 0
    return json.loads(out.read_text())


def assert_same_answer(got: dict, expected: dict) -> None:
    """The server's record is predict's (the image's name aside): the same classes, numbers within 1e-5."""
    got = {k: v for k, v in got.items() if k not in ("image", "served_by")}
    expected = {k: v for k, v in expected.items() if k != "image"}
    assert sorted(got) == sorted(expected)
    assert [t["class"] for t in got["topk"]] == [t["class"] for t in expected["topk"]]
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(got["topk"], expected["topk"], strict=True)) <= 1e-5
    for key, value in expected.items():
        if isinstance(value, float):
            assert abs(got[key] - value) <= 1e-5, key
        elif key != "topk":
            assert got[key] == value, key


@pytest.mark.slow
def test_answers_equal_predict_in_every_request_form(server, tiny_export, car_images, tmp_path):
    """Multipart, raw body and JSON base64 get predict's record of the image; an animated GIF (its first frame)
    and a 16-bit PNG (scaled to 8 bits) too, as predict answers them."""
    rng = np.random.default_rng(7)
    gif, png16 = tmp_path / "anim.gif", tmp_path / "deep.png"
    frames = [Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.fromarray(rng.integers(0, 65535, (60, 80), dtype=np.uint16)).save(png16)
    images = [*car_images, gif, png16]
    expected = predict_records(images, tiny_export, tmp_path, "--precision", "fp32")
    for path, reference in zip(images, expected, strict=True):
        data = path.read_bytes()
        forms = [server.predict(files={"image": (path.name, data, "application/octet-stream")}),
                 server.predict(content=data, headers={"Content-Type": f"image/{path.suffix[1:]}"}),
                 server.predict(json={"image": base64.b64encode(data).decode()})]
        for r in forms:
            assert r.status_code == 200, r.text
            answer = r.json()
            assert_same_answer(answer, reference)
            assert answer["served_by"] == {"file": "model.pth", "architecture": "resnet18",
                                           "twincar_version": answer["served_by"]["twincar_version"]}
        assert forms[0].json()["image"] == path.name and forms[1].json()["image"] == "<request body>"


@pytest.mark.slow
def test_health_info_and_the_openapi_page(server):
    assert server.client.get("/health").text == "ok"
    info = server.client.get("/info").json()
    model = info["model"]
    assert model["class_names"] == TINY_NAMES and model["engine"] == "torch" and model["architecture"] == "resnet18"
    assert model["input"]["crop"]["size"] == [64, 64] and model["unknown_threshold"] is None
    assert info["server"]["devices"] == ["cpu"]
    assert "/predict" in server.client.get("/openapi.json").json()["paths"]
    assert server.client.get("/docs").status_code == 200


@pytest.mark.slow
def test_concurrent_clients_all_get_answers_in_batches(server):
    """16 clients x 5 requests each, at once: every one answered, and forward passes served several requests."""
    images = [jpeg_bytes(i) for i in range(4)]

    def client(i: int) -> list[tuple[int, int, str]]:
        with httpx.Client(timeout=TIMEOUT) as c:
            out = []
            for j in range(5):
                r = c.post(f"{server.url}/predict", content=images[(i + j) % 4], headers={"Content-Type": "image/jpeg"})
                out.append((r.status_code, int(r.headers.get("x-batch-size", 0)), r.json().get("class", "")))
            return out

    with ThreadPoolExecutor(16) as pool:
        results = [x for xs in pool.map(client, range(16)) for x in xs]
    assert len(results) == 80 and {code for code, _, _ in results} == {200}
    assert max(size for _, size, _ in results) > 1  # requests really were batched
    assert all(name in TINY_NAMES for _, _, name in results)


def bad_requests() -> list[tuple[str, dict, int, str]]:
    """(what, request, status, words of the sentence)."""
    truncated = jpeg_bytes(3, (400, 300))
    bomb = io.BytesIO()
    Image.new("1", (20000, 10000)).save(bomb, "PNG")  # a few kB that would decode to 200 megapixels
    jpeg = {"Content-Type": "image/jpeg"}
    return [
        ("not an image", dict(content=b"hello, not a photo", headers=jpeg), 400, "not an image"),
        ("an empty body", dict(content=b"", headers=jpeg), 400, "empty (0 bytes)"),
        ("a truncated JPEG", dict(content=truncated[: len(truncated) // 2], headers=jpeg), 400, "truncated"),
        ("a decompression bomb", dict(content=bomb.getvalue(), headers={"Content-Type": "image/png"}), 413,
         "decompression bomb"),
        ("a body over the limit", dict(content=b"\xff" * (2**20 + 10), headers=jpeg), 413, "over the 1 MB limit"),
        ("an unsupported content type", dict(content=b"x", headers={"Content-Type": "text/plain"}), 415,
         "unsupported content type text/plain"),
        ("a URL to fetch", dict(json={"image": "http://127.0.0.1:9/car.jpg"}), 400, "never fetches a URL"),
        ("JSON without base64", dict(json={"image": "not base64!"}), 400, "not base64"),
        ("JSON without an image", dict(json={"photo": "abc"}), 400, '{"image": BASE64}'),
        ("a form without the image field", dict(files={"photo": ("a.jpg", b"x")}), 400, "file field named image"),
    ]


@pytest.mark.slow
def test_every_bad_request_gets_its_status_and_sentence_and_the_next_is_answered(server):
    good = dict(content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})
    for what, request, status, words in bad_requests():
        r = server.predict(**request)
        assert r.status_code == status, (what, r.text)
        detail = r.json()["detail"]
        assert words in detail and "\n" not in detail and "Traceback" not in detail, (what, detail)
        assert server.predict(**good).status_code == 200, what


@pytest.mark.slow
def test_a_bad_image_in_a_batch_spoils_none_of_the_others(server):
    """Good and bad images sent at once (so batched together): each gets its own answer."""
    good, bad = jpeg_bytes(5), b"\x89PNG\r\n\x1a\n broken"

    def send(data):
        return server.predict(content=data, headers={"Content-Type": "image/png"}).status_code

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(send, [good, bad] * 4))
    assert codes == [200, 400] * 4


@pytest.mark.slow
def test_a_flood_is_refused_with_503_and_disconnected_clients_leave_it_serving(server):
    """Clients that send headers and part of the body, then hang, fill the queue: the next request is 503 (memory
    stays bounded); once they disconnect mid-request the server answers again."""
    def stall() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT)
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000\r\n\r\n"
                  + b"\xff\xd8" * 10)
        return s

    def probe() -> httpx.Response:
        return server.predict(content=jpeg_bytes(), headers={"Content-Type": "image/jpeg"})

    stalled = [stall() for _ in range(MAX_QUEUE)]
    try:  # a probe may be taken in before the last stalled clients: one more then, until the queue is full
        while (r := probe()).status_code != 503:
            assert r.status_code == 200 and len(stalled) < 3 * MAX_QUEUE, f"no 503 when full: {r.status_code}"
            stalled.append(stall())
            time.sleep(0.2)
        assert "busy" in r.json()["detail"] and r.headers["retry-after"] == "1"
    finally:
        for s in stalled:
            s.close()
    deadline = time.monotonic() + TIMEOUT
    while (r := probe()).status_code == 503:
        assert time.monotonic() < deadline, "still busy after the clients disconnected"
        time.sleep(0.2)
    assert r.status_code == 200 and server.proc.poll() is None


@pytest.mark.slow
def test_the_onnx_server_runs_without_torch_and_answers_as_predict(servers, car_images, tmp_path):
    """With torch and torchvision unimportable in every process, the ONNX export is served; its answers are
    predict's, and a threshold that rejects every image answers known=false."""
    s = servers["onnx"]
    expected = predict_records(car_images, servers["onnx_model"], tmp_path, "--unknown", "1e6")
    for path, reference in zip(car_images, expected, strict=True):
        r = s.predict(files={"image": (path.name, path.read_bytes(), "image/png")})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["known"] is False and reference["known"] is False
        assert answer["class"] == "not one of the 6 known classes" and answer["make"] is None
        assert_same_answer(answer, reference)
    assert s.client.get("/info").json()["model"]["engine"] == "onnx"
    assert "blocked" not in s.log.read_text()


def test_a_model_that_cannot_load_is_one_sentence_before_the_port_opens(tmp_path, capsys):
    from twincar.serve import main

    port = free_port()
    assert main(["--model", str(tmp_path / "missing.onnx"), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "missing.onnx" in err and "does not exist" in err and "\n" not in err
    with socket.socket() as s:  # nothing listens there
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert main(["--model", str(tmp_path / "missing.onnx"), "--host", "10.1.2.3"]) == 1
    assert "--host 10.1.2.3" in capsys.readouterr().err


@pytest.mark.slow  # the module's servers; runs last: it stops the PyTorch one
def test_ctrl_c_stops_every_process_of_the_server_without_a_traceback(servers):
    """Ctrl+C in a terminal sends SIGINT to the whole process group (the main process, the HTTP process and the
    inference workers): every one of them ends, and the log shows no traceback."""
    server = servers["torch"]
    os.killpg(server.proc.pid, signal.SIGINT)
    assert server.proc.wait(timeout=60) is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(server.proc.pid, 0)  # some process of the group is still there
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"processes of the server outlived Ctrl+C: {server.log.read_text()[-2000:]}")
    assert "Traceback" not in server.log.read_text(), server.log.read_text()[-3000:]
