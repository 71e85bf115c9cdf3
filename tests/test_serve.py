"""`headstart serve` as a user runs it: a real server process, real HTTP on loopback.

One server (module fixture) answers every test, with small limits so the oversized cases are
cheap; after each bad request it must still answer /health and predict correctly.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headstart.backbones import build_backbone
from headstart.checkpoints import save_checkpoint
from headstart.cli import main as headstart
from headstart.familiarity import build_guard, guard_bytes, guard_path
from headstart.inference import run_inference
from headstart.loaders import ImageDataset
from headstart.model import Classifier
from headstart.transforms import eval_transform

CLASSES = ["bird", "cat", "dog"]
SIZE = 32
MEAN, STD = [0.2, 0.4, 0.6], [0.3, 0.2, 0.1]
MAX_BODY_MB = 0.25
MAX_FILES = 8


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, image_folder_factory) -> Path:
    """A checkpoint (the shipped pretrained backbone, a random head) with a guard beside it
    built from the synthetic class images, and those images."""
    root = tmp_path_factory.mktemp("served")
    images = image_folder_factory(root / "images")
    torch.manual_seed(0)
    model = Classifier(build_backbone("efficientnet_lite0", "pretrained"), len(CLASSES))
    with torch.no_grad():
        model.head.weight.mul_(5.0)
    path = root / "finetuned.pt"
    meta = {
        "kind": "classifier",
        "backbone": "efficientnet_lite0",
        "num_features": model.backbone.num_features,
        "image_size": SIZE,
        "mean": MEAN,
        "std": STD,
        "classes": CLASSES,
        "params": {},
        "summary": {},
    }
    save_checkpoint(path, model.state_dict(), meta)
    paths = sorted(str(p.relative_to(images)) for p in images.rglob("*.*"))
    dataset = ImageDataset(images, paths, [0] * len(paths), eval_transform(SIZE, MEAN, STD), SIZE)
    features, _ = run_inference(
        model.backbone.eval(),
        torch.utils.data.DataLoader(dataset, batch_size=8),
        torch.device("cpu"),
    )
    guard = build_guard(features[::2], features[1::2], neighbours=3, flag_rate=0.05)
    guard_path(path).write_bytes(guard_bytes(guard, path))
    return root


@pytest.fixture(scope="module")
def server(model_dir):
    """`headstart serve` on a free port; yields 'host:port'."""
    process = subprocess.Popen(
        [sys.executable, "-m", "headstart.cli", "serve", str(model_dir / "finetuned.pt")]
        + ["--port", "0", "--max-body-mb", str(MAX_BODY_MB), "--max-files", str(MAX_FILES)],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    address, log = None, []
    deadline = time.monotonic() + 120
    while address is None and time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line and process.poll() is not None:
            break
        log.append(line)
        found = re.search(r"Uvicorn running on http://([\d.]+:\d+)", line)
        address = found and found.group(1)
    assert address, "".join(log)
    yield address
    process.terminate()
    process.wait(timeout=30)


def request(address: str, method: str, path: str, body=None, headers=None):
    """(status, parsed JSON body)."""
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        chunked = (headers or {}).get("Transfer-Encoding") == "chunked"
        connection.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + data
        + b"\r\n"
        for name, data in files
    ]
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def assert_healthy(address: str, model_dir: Path) -> None:
    assert request(address, "GET", "/health") == (200, {"status": "ok"})
    image = model_dir / "images" / "cat" / "cat_00.png"
    status, results = request(address, "POST", "/predict", image.read_bytes())
    assert status == 200 and results[0]["error"] is None and results[0]["predictions"]


def expected_predictions(model_dir: Path, capsys, files: list[Path], top_k: int = 1) -> list:
    """What `headstart predict --format json` says for the files."""
    model = model_dir / "finetuned.pt"
    code = headstart(
        ["predict", str(model), *map(str, files), "--format", "json", "--top-k", str(top_k)]
    )
    assert code == 0
    return json.loads(capsys.readouterr().out)


def _same(served: dict, predicted: dict) -> None:
    assert [p["class"] for p in served["predictions"]] == [
        p["class"] for p in predicted["predictions"]
    ]
    for a, b in zip(served["predictions"], predicted["predictions"], strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    assert served["familiar"] == predicted["familiar"]
    assert served["distance"] == pytest.approx(predicted["distance"], abs=1e-5)


def test_binds_loopback_and_describes_the_model(server, model_dir):
    assert server.startswith("127.0.0.1:")
    status, description = request(server, "GET", "/model")
    assert status == 200
    assert description["classes"] == CLASSES and description["image_size"] == SIZE
    assert description["guard"]["neighbours"] == 3 and description["temperature"] == 1.0


def test_good_images_get_what_predict_gives(server, model_dir, capsys):
    files = sorted((model_dir / "images" / "dog").iterdir())[:5]
    expected = expected_predictions(model_dir, capsys, files, top_k=2)
    # Raw bytes, one image a request.
    for path, predicted in zip(files, expected, strict=True):
        status, results = request(
            server, "POST", "/predict?top_k=2", path.read_bytes(), {"X-Filename": path.name}
        )
        assert status == 200 and results[0]["path"] == path.name
        _same(results[0], predicted)
    # Multipart, all in one request, in order.
    body, headers = multipart([(p.name, p.read_bytes()) for p in files])
    status, results = request(server, "POST", "/predict?top_k=2", body, headers)
    assert status == 200 and [r["path"] for r in results] == [p.name for p in files]
    for served, predicted in zip(results, expected, strict=True):
        _same(served, predicted)


def test_noise_is_unfamiliar(server, model_dir):
    noise = _png(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    status, results = request(server, "POST", "/predict", noise)
    assert status == 200 and results[0]["familiar"] is False


@pytest.mark.parametrize(
    "body, reason",
    [
        (b"not a picture at all\n", "unreadable"),
        (_png(np.zeros((40, 40, 3), np.uint8))[:60], "truncated"),
        (None, "too_large"),  # a decompression bomb: 400 megapixels in ~50 KB
    ],
    ids=["not-an-image", "truncated", "decompression-bomb"],
)
def test_a_bad_image_is_a_422_with_its_reason(server, model_dir, body, reason):
    if body is None:
        buffer = io.BytesIO()
        Image.new("1", (20000, 20000)).save(buffer, "PNG")
        body = buffer.getvalue()
    status, answer = request(server, "POST", "/predict", body)
    assert status == 422 and f": {reason}: " in answer["detail"]
    assert "\n" not in answer["detail"]
    assert_healthy(server, model_dir)


def test_a_bad_file_among_good_ones_carries_its_error(server, model_dir):
    good = (model_dir / "images" / "bird" / "bird_01.jpg").read_bytes()
    body, headers = multipart([("good.jpg", good), ("notes.txt", b"labelling notes")])
    status, results = request(server, "POST", "/predict", body, headers)
    assert status == 200
    assert results[0]["error"] is None and results[1]["error"]["reason"] == "unreadable"


def test_limits_and_empty_requests_are_4xx(server, model_dir):
    limit = int(MAX_BODY_MB * (1 << 20))
    status, answer = request(server, "POST", "/predict", b"\0" * (limit + 1))
    assert status == 413 and "--max-body-mb" in answer["detail"]
    assert_healthy(server, model_dir)

    # Streamed in chunks, no declared length: refused once it passes the limit.
    chunks = (b"\0" * 65536 for _ in range(limit // 65536 + 2))
    status, answer = request(server, "POST", "/predict", chunks, {"Transfer-Encoding": "chunked"})
    assert status == 413
    assert_healthy(server, model_dir)

    tiny = _png(np.full((8, 8, 3), 200, np.uint8))
    body, headers = multipart([(f"{n}.png", tiny) for n in range(MAX_FILES + 1)])
    status, answer = request(server, "POST", "/predict", body, headers)
    assert status == 400 and "files" in answer["detail"].lower()
    assert_healthy(server, model_dir)

    assert request(server, "POST", "/predict", b"")[0] == 400
    assert request(server, "POST", "/predict?top_k=0", tiny)[0] == 422
    assert request(server, "POST", "/predict?top_k=x", tiny)[0] == 422
    assert_healthy(server, model_dir)


def test_fifty_concurrent_requests_are_all_answered_correctly(server, model_dir, capsys):
    files = sorted((model_dir / "images").rglob("*.*"))
    predicted = expected_predictions(model_dir, capsys, files)
    expected = {p.name: e for p, e in zip(files, predicted, strict=True)}
    jobs = [files[n % len(files)] for n in range(50)]

    def one(path: Path):
        return path.name, request(
            server, "POST", "/predict", path.read_bytes(), {"X-Filename": path.name}
        )

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(one, jobs))
    assert len(answers) == 50
    for name, (status, results) in answers:
        assert status == 200 and results[0]["path"] == name
        _same(results[0], expected[name])
    assert_healthy(server, model_dir)
