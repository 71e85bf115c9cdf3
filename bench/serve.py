"""`headstart serve` against `headstart predict` on the same images: images per second.

The images are the prepared test split (after `dvc repro`). `predict` is timed twice: the whole
command (a new process: imports and model load included, as a user runs it on a folder), and
its prediction alone (predict_files in this process, batch 32). The server is started once
(its start-up not counted), then sent every image as one request each by C concurrent
clients, and as multipart requests of 16 images. Every answer is checked against predict's.
The last line is the ratio of the server's best rate to predict's.

    python bench/serve.py [--model models/finetuned.pt] [--data-dir data/digits]
        [--prepared data/prepared] [--clients 1,8,32]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # before tqdm is imported: a table, not bars

import torch

from headstart.cli import resolve_guard, resolve_temperature
from headstart.index import load_prepared
from headstart.model import load_classifier
from headstart.params import load_params
from headstart.prediction import predict_files


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "headstart.cli", "serve", str(model), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    for line in process.stderr:
        found = re.search(r"Uvicorn running on http://([\d.]+:\d+)", line)
        if found:
            return process, found.group(1)
    raise SystemExit("the server did not start")


def post(address: str, body: bytes, headers: dict[str, str]) -> list[dict]:
    host, port = address.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.request("POST", "/predict", body=body, headers=headers)
        response = connection.getresponse()
        answer = json.loads(response.read())
        assert response.status == 200, answer
        return answer
    finally:
        connection.close()


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (
        b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            f"\r\n".encode()
            + data
            + b"\r\n"
            for name, data in files
        )
        + f"--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/finetuned.pt"))
    parser.add_argument("--data-dir", type=Path, default=None, help="default: params data.dir")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--clients", default="1,8,32")
    args = parser.parse_args()
    prepared = load_prepared(args.data_dir or Path(load_params().data.dir), args.prepared)
    paths = [prepared.root / p for p in prepared.split("test").paths]
    payloads = [(p.name, p.read_bytes()) for p in paths]
    print(f"{len(paths)} test images, {args.model}; torch threads {torch.get_num_threads()}")

    start = time.perf_counter()
    command = [sys.executable, "-m", "headstart.cli", "predict", str(args.model)]
    out = subprocess.run(
        [*command, *map(str, paths), "--format", "json"], capture_output=True, check=True
    ).stdout
    whole = len(paths) / (time.perf_counter() - start)
    expected = {Path(r["path"]).name: r for r in json.loads(out)}
    model, meta = load_classifier(args.model)
    start = time.perf_counter()
    predict_files(
        model,
        meta,
        paths,
        top_k=1,
        batch_size=32,
        device=torch.device("cpu"),
        temperature=resolve_temperature(args.model, "auto"),
        guard=resolve_guard(args.model, "auto"),
    )
    alone = len(paths) / (time.perf_counter() - start)
    print(f"headstart predict, whole command: {whole:.1f} images/s")
    print(f"headstart predict, prediction alone (batch 32): {alone:.1f} images/s")

    def check(results: list[dict], names: list[str]) -> None:
        for result, name in zip(results, names, strict=True):
            want = expected[name]
            assert result["predictions"][0]["class"] == want["predictions"][0]["class"], name
            if want["distance"] is not None:  # with the guard beside the model
                assert abs(result["distance"] - want["distance"]) < 1e-4, name

    process, address = start_server(args.model)
    rates = {}
    try:
        post(address, payloads[0][1], {})  # warm-up
        for clients in [int(c) for c in args.clients.split(",")]:

            def one(item):
                name, data = item
                check(post(address, data, {"X-Filename": name}), [name])

            start = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(one, payloads))
            rates[f"{clients} client(s), 1 image a request"] = len(paths) / (
                time.perf_counter() - start
            )
        groups = [payloads[i : i + 16] for i in range(0, len(payloads), 16)]

        def batch(group):
            check(post(address, *multipart(group)), [name for name, _ in group])

        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(batch, groups))
        rates["4 clients, 16 images a request"] = len(paths) / (time.perf_counter() - start)
    finally:
        process.terminate()
        process.wait(timeout=30)
    for name, rate in rates.items():
        print(f"headstart serve, {name}: {rate:.1f} images/s ({rate / alone:.2f}x predict alone)")
    best = max(rates, key=rates.get)
    print(
        f"best server rate / predict: {rates[best] / alone:.2f}x prediction alone, "
        f"{rates[best] / whole:.2f}x the whole command ({best})"
    )


if __name__ == "__main__":
    main()
