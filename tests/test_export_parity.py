"""Exports predict what `headstart predict` predicts: ONNX in onnxruntime and TorchScript, for a
model of every backbone family, on real image files, at batch sizes 1 and 37.

Each family's model is real but small: the shipped EfficientNet-Lite0 weights, torchvision's
smallest member of each family and timm's tiny test architectures, random-init, with a head
scaled up so the probabilities differ between images (asserted: agreement on near-constant
outputs would prove nothing). The calibration temperature is 0.7, not 1, so a format that
dropped it would be caught. The inputs the exports get are predict's own pixels, decoded and
resized as in training, before ToTensor's division by 255 (uint8, exact).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from conftest import draw_image
from PIL import Image

from headstart.backbones import backbone_spec, build_backbone
from headstart.checkpoints import save_checkpoint
from headstart.export import EXPORT_FORMATS, export_model
from headstart.export_onnx import INPUT_NAME
from headstart.images import decode_image
from headstart.model import Classifier, load_classifier
from headstart.prediction import predict_files
from headstart.transforms import decode_size, eval_transform, preprocessing, split_normalization

CLASSES = ["bird", "cat", "dog", "fish"]
TEMPERATURE = 0.7
BATCH = 37
# (backbone, weights, input size): one of each family in backbones.BACKBONES, and timm's.
FAMILIES = [
    ("efficientnet_lite0", "pretrained", 32),
    ("resnet18", "none", 32),
    ("mobilenet_v3_small", "none", 32),
    ("efficientnet_b0", "none", 32),
    ("convnext_tiny", "none", 32),
    ("timm:test_vit.r160_in1k", "none", 160),  # a fixed-size ViT: its own 160 px
    ("timm:test_convnext.r160_in1k", "none", 48),  # crop_pct 0.95: resize to 50, crop 48
]
DOCS = Path(__file__).resolve().parents[1] / "docs" / "using-the-model.md"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """37 files: PNG and JPEG, RGB and greyscale, portrait, landscape and square, some at least
    twice the input size (JPEG draft decoding), with EXIF orientation on some JPEGs."""
    root = tmp_path_factory.mktemp("images")
    paths = []
    for index in range(BATCH):
        label = CLASSES[index % len(CLASSES)]
        size = ((40, 52), (60, 60), (90, 50), (36, 36), (130, 110))[index % 5]
        image = Image.fromarray(draw_image(label, seed=index, size=size), "RGB")
        if index % 3 == 0:
            image = image.convert("L")
        path = root / f"{index:02d}_{label}.{'jpg' if index % 2 else 'png'}"
        if path.suffix == ".jpg":
            exif = Image.Exif()
            exif[0x0112] = 6 if index % 4 == 1 else 1  # orientation: rotate 90 on some
            image.save(path, "JPEG", quality=90, exif=exif)
        else:
            image.save(path, "PNG")
        paths.append(path)
    return paths


def _checkpoint(
    folder: Path,
    name: str,
    weights: str,
    size: int,
    images: list[Path],
    interpolation: str | None = None,
) -> Path:
    """A classifier checkpoint as finetune writes it; a random-init backbone's BatchNorm
    statistics and the random head are fitted to `images` (see _fit_to)."""
    spec = backbone_spec(name)
    meta = {
        "kind": "classifier",
        "backbone": name,
        "image_size": size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "interpolation": interpolation or spec.interpolation,
        "crop_pct": spec.crop_pct,
        "classes": CLASSES,
        "params": {},
        "summary": {},
    }
    torch.manual_seed(0)
    model = Classifier(build_backbone(name, weights), len(CLASSES))
    transform = eval_transform(**preprocessing(meta))
    batch = torch.stack([transform(decode_image(p, decode_size(meta)).image) for p in images])
    _fit_to(model, batch, batchnorm=weights == "none")
    path = folder / "finetuned.pt"
    save_checkpoint(path, model.state_dict(), {**meta, "num_features": model.backbone.num_features})
    return path


def _fit_to(model: Classifier, batch: torch.Tensor, batchnorm: bool) -> None:
    """Make a random model's probabilities differ between the images of `batch`: BatchNorm
    statistics from the batch (with the initial mean 0, variance 1 some families, such as
    MobileNetV3, give every image the same features), then each class's logit centred and
    scaled to a spread of 2 (neither equal nor saturated probabilities)."""
    if batchnorm:
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a plain average over the batches seen
        model.train()
        with torch.no_grad():
            model(batch)
    model.eval()
    with torch.no_grad():
        logits = model(batch)  # (N, num_classes)
        scale = 2.0 / logits.std(0).clamp_min(1e-6)  # (num_classes,)
        model.head.bias.sub_(logits.mean(0)).mul_(scale)
        model.head.weight.mul_(scale[:, None])


def predicted(checkpoint: Path, paths: list[Path], tta: str = "none") -> np.ndarray:
    """(N, num_classes) `headstart predict`'s probabilities, in the order of CLASSES."""
    model, meta = load_classifier(checkpoint)
    results = predict_files(
        model,
        meta,
        paths,
        top_k=len(CLASSES),
        batch_size=8,
        device=torch.device("cpu"),
        temperature=TEMPERATURE,
        tta=tta,
    )
    assert all(result.ok for result in results)
    return np.array(
        [[dict(zip(r.classes, r.probabilities, strict=True))[c] for c in CLASSES] for r in results]
    )


def predict_pixels(checkpoint: Path, paths: list[Path]) -> np.ndarray:
    """(N, 3, S, S) uint8: what predict feeds the model before ToTensor and Normalize."""
    _, meta = load_classifier(checkpoint)
    to_pixels, _ = split_normalization(eval_transform(**preprocessing(meta)))
    return torch.stack([to_pixels(decode_image(p, decode_size(meta)).image) for p in paths]).numpy()


@pytest.fixture(scope="module", params=FAMILIES, ids=[family[0] for family in FAMILIES])
def family(request, tmp_path_factory, images):
    """(checkpoint, predict's probabilities, predict's pixels) for one family's model."""
    name, weights, size = request.param
    checkpoint = _checkpoint(tmp_path_factory.mktemp("model"), name, weights, size, images)
    expected = predicted(checkpoint, images)
    # The images' probabilities differ (by class, by image), so agreement means something.
    assert np.ptp(expected, axis=0).max() > 0.05, name
    assert len(set(expected.argmax(1).tolist())) > 1, name
    return checkpoint, expected, predict_pixels(checkpoint, images)


def _run_onnx(data: bytes):
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    return lambda pixels: session.run(None, {INPUT_NAME: pixels})[0]


def _run_torchscript(data: bytes, folder: Path):
    path = folder / "model.ts.pt"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
        module = torch.jit.load(str(path))

    def run(pixels: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(pixels)).numpy()

    return run


@pytest.mark.parametrize("format_name", sorted(EXPORT_FORMATS))
def test_the_export_predicts_like_predict_at_batch_1_and_37(family, format_name, tmp_path):
    checkpoint, expected, pixels = family
    data, description = export_model(format_name, checkpoint, TEMPERATURE)
    assert description["temperature"] == TEMPERATURE and description["classes"] == CLASSES
    if format_name == "onnx":
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
        run = _run_onnx(data)
    else:
        run = _run_torchscript(data, tmp_path)
    whole = run(pixels)  # one batch of 37
    single = np.concatenate([run(pixels[i : i + 1]) for i in range(len(pixels))])  # 37 of 1
    for got in (whole, single):
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()


def _documented_block(heading: str) -> str:
    """The first Python block under `heading` in docs/using-the-model.md."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_five_lines_give_predicts_probabilities(images, tmp_path):
    """The docs' snippet, run as written (no headstart import) on files the model was exported
    to, equals predict on every image, and the docs' flip recipe after it equals predict
    --tta flip. The model resizes to 50 px (crop_pct 0.95), bilinear, then crops 48 px, so
    the snippet must read the sidecar's steps rather than assume them."""
    snippet = _documented_block("### Run the ONNX file without headstart")
    flip = _documented_block("### Flip test-time augmentation with an export")
    assert len(snippet.strip().splitlines()) == 5
    assert "headstart" not in snippet + flip
    checkpoint = _checkpoint(
        tmp_path, "timm:test_convnext.r160_in1k", "none", 48, images, "bilinear"
    )
    data, description = export_model("onnx", checkpoint, TEMPERATURE)
    assert description["resize"] == {
        "short_side": 50,
        "interpolation": "bilinear",
        "antialias": True,
    }
    (tmp_path / "model.onnx").write_bytes(data)
    (tmp_path / "model.onnx.json").write_text(json.dumps(description), encoding="utf-8")
    body = snippet.replace('"photo.jpg"', "path").strip().splitlines() + flip.strip().splitlines()
    program = (
        "import json, sys\n"
        "rows = []\n"
        "for path in sys.argv[1:]:\n"
        + "".join(f"    {line}\n" for line in body)
        + "    rows.append([probabilities[0].tolist(), flip_probabilities[0].tolist()])\n"
        "assert 'headstart' not in sys.modules\n"
        "print(json.dumps(rows))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", program, *map(str, images)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = np.array(json.loads(result.stdout))  # (N, 2, num_classes)
    for got, tta in ((rows[:, 0], "none"), (rows[:, 1], "flip")):
        expected = predicted(checkpoint, images, tta)
        assert np.abs(got - expected).max() < 1e-4, tta
        assert (got.argmax(1) == expected.argmax(1)).all(), tta
    assert np.abs(rows[:, 0] - rows[:, 1]).max() > 0.01  # the mirror changes something


def test_the_format_follows_the_suffix_and_a_contradiction_is_refused():
    from headstart.errors import UsageError
    from headstart.export import choose_format

    assert choose_format(Path("models/finetuned.onnx"), None) == "onnx"
    assert choose_format(Path("model.ts.pt"), None) == "torchscript"
    assert choose_format(Path("model.bin"), None) == "onnx"  # the default
    assert choose_format(Path("model.bin"), "torchscript") == "torchscript"
    with pytest.raises(UsageError, match=r"model\.onnx: \.onnx is the suffix of onnx files, not"):
        choose_format(Path("model.onnx"), "torchscript")
    sidecars = {
        name: spec.sidecar_path(Path("m" + spec.suffix)) for name, spec in EXPORT_FORMATS.items()
    }
    assert sidecars == {"onnx": Path("m.onnx.json"), "torchscript": Path("m.json")}
