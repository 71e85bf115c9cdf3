"""The ONNX export: torch's own exporter (`torch.onnx.export`, the torch.export-based one),
checked with `onnx.checker` and, when it is installed, run in onnxruntime against the model.

The graph takes one input, `images`: uint8 (B, 3, S, S) RGB in [0, 255], any batch size B
(the one dynamic axis), and returns `probabilities` (B, num_classes). uint8 rather than float
because predict's pixels are exactly integers before ToTensor divides by 255: serving code
hands over the decoded pixels as they are and gets predict's numbers, with no float
conventions to agree on. The Cast and the division by 255 are the graph's first nodes.

The bytes depend only on the model: the exporter records, per node, the Python stack that
made it (absolute paths of this checkout and of site-packages), the module path and the FX
node; all of that metadata and every doc string is cleared before serialising.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from headstart.errors import ArtifactError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
# The highest opset torch 2.14's exporter writes by default; fixed so a torch upgrade that
# moves the default changes the file only through a pin change here.
OPSET = 20
# onnxruntime's kernels (fused convolutions, other summation orders) differ from torch's in the
# last float digits; a broken export differs by orders of magnitude more.
TOLERANCE = 1e-4


class Uint8Input(nn.Module):
    """uint8 (B, 3, S, S) in [0, 255] -> float in [0, 1] -> `inner` (float images in [0, 1])."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.inner(images.to(torch.float32) / 255.0)


def to_onnx(inner: nn.Module, size: int) -> bytes:
    """The checked ONNX bytes of `inner` (float [0, 1] images (B, 3, S, S) -> probabilities)
    behind a uint8 input, with a dynamic batch axis."""
    model = Uint8Input(inner).eval().cpu()
    example = _example(2, size, seed=0)
    with warnings.catch_warnings(), _quiet("onnx_ir", "onnxscript"):
        # The exporter's own progress notes and deprecations of internals it calls.
        for category in (FutureWarning, DeprecationWarning, UserWarning):
            warnings.simplefilter("ignore", category)
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=OPSET,
                dynamo=True,
                # One file: models above protobuf's 2 GB limit cannot be exported this way.
                external_data=False,
                # One name for the batch axis of the input and (by propagation) the output.
                dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
                verbose=False,
            )
        except torch.onnx.OnnxExporterError as error:
            first_line = (str(error).splitlines() or [type(error).__name__])[0]
            raise ArtifactError(
                f"torch's ONNX exporter cannot export this model ({first_line}); "
                "use --format torchscript"
            ) from error
    proto = program.model_proto
    strip_varying(proto)
    data = proto.SerializeToString(deterministic=True)
    check_onnx(data, model, size)
    return data


def strip_varying(proto) -> None:
    """Clear, in place, what names where and how the graph was made rather than what it
    computes: metadata_props and doc strings of the model, graph, nodes, values, initializers
    and functions (subgraphs in node attributes included)."""

    def clear(item) -> None:
        if hasattr(item, "metadata_props"):
            del item.metadata_props[:]
        if hasattr(item, "doc_string"):
            item.doc_string = ""

    def graph(g) -> None:
        clear(g)
        for collection in (g.input, g.output, g.value_info, g.initializer, g.sparse_initializer):
            for item in collection:
                clear(item)
        for node in g.node:
            nodes(node)

    def nodes(node) -> None:
        clear(node)
        for attribute in node.attribute:
            clear(attribute)
            if attribute.HasField("g"):
                graph(attribute.g)
            for sub in attribute.graphs:
                graph(sub)

    clear(proto)
    graph(proto.graph)
    for function in proto.functions:
        clear(function)
        for node in function.node:
            nodes(node)


def check_onnx(data: bytes, model: nn.Module, size: int) -> float:
    """onnx.checker on `data`, then (when onnxruntime is installed) its probabilities against
    `model` (uint8 images in) on batches of 1 and 3; the largest difference, or NaN when the
    runtime is missing. ArtifactError on a failure."""
    import onnx

    try:
        onnx.checker.check_model(onnx.load_from_string(data), full_check=True)
    except onnx.checker.ValidationError as error:
        raise ArtifactError(f"the ONNX export fails onnx.checker: {error}") from error
    try:
        import onnxruntime
    except ImportError:
        log.warning(
            "onnxruntime is not installed: the ONNX export passed onnx.checker but was not run; "
            "pip install onnxruntime to check its probabilities"
        )
        return float("nan")
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    difference = 0.0
    for batch in (1, 3):  # not the traced batch of 2: the batch axis must really be dynamic
        images = _example(batch, size, seed=batch)
        with torch.inference_mode():
            expected = model(images).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
        difference = max(difference, float(np.abs(expected - got).max()))
    if not difference <= TOLERANCE:  # NaN compares false
        raise ArtifactError(
            f"the ONNX export's probabilities in onnxruntime differ from the model's by "
            f"{difference:.2e} (more than {TOLERANCE:.0e}); this backbone does not export "
            "faithfully, use --format torchscript"
        )
    log.info("ONNX export checked: onnx.checker passes; onnxruntime within %.1e", difference)
    return difference


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """The exporter's passes log every rewrite at INFO (hundreds of lines under -v)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _example(batch: int, size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
