"""Inference speed of resnet18: PyTorch vs ONNX Runtime, one image and a large batch."""

from __future__ import annotations

from collections.abc import Callable

import onnxruntime as ort
import torch

from bench.report import Section, verdict
from bench.timing import BatchClock, Rate, rate_of
from bench.workspace import Workspace
from leukemia_mlops.models.backbones import build_classifier

TITLE = "Inference: PyTorch vs ONNX Runtime (resnet18)"


def export(net: torch.nn.Module, size: int, path: str) -> ort.InferenceSession:
    """The TorchScript-based export (as the project ships models), any batch size."""
    torch.onnx.export(
        net,
        (torch.zeros(1, 3, size, size),),
        path,
        dynamo=False,
        input_names=["images"],
        output_names=["logit_all"],
        dynamic_axes={"images": {0: "batch"}, "logit_all": {0: "batch"}},
        opset_version=17,
    )
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def timed(call: Callable[[], object], batch: int, ws: Workspace) -> Rate:
    clock = BatchClock(ws.sizes.warmup, ws.sizes.budget_s / 4)
    return rate_of(lambda: (call(), batch)[1], clock)


def run(ws: Workspace) -> Section:
    size = ws.image_size
    net = build_classifier("resnet18").eval()  # NCHW fp32, as the project's TorchScorer
    session = export(net, size, str(ws.root / "resnet18.onnx"))
    rows, readings, raw = [], [], {}
    for batch in ws.sizes.infer_batches:
        images = torch.rand(batch, 3, size, size)
        feed = {"images": images.numpy()}
        with torch.inference_mode():
            torch_rate = timed(lambda images=images: net(images), batch, ws)
        onnx_rate = timed(lambda feed=feed: session.run(None, feed), batch, ws)
        ratio = onnx_rate.per_s / torch_rate.per_s
        rows.append([batch, torch_rate.per_s, onnx_rate.per_s, ratio])
        readings.append(verdict(f"batch {batch}: ONNX Runtime vs PyTorch", ratio, 1.0))
        raw[f"batch {batch}"] = {"torch": torch_rate.as_dict(), "onnx": onnx_rate.as_dict()}
    return Section(
        TITLE,
        f"Images/s of the resnet18 classifier network at {size} px (the training size), fp32, "
        f"all {torch.get_num_threads()} threads: PyTorch eval under `inference_mode` vs the "
        "same network exported with `torch.onnx.export(dynamo=False)` run by ONNX Runtime's "
        "CPU provider (default session options). Untrained weights: speed does not depend on "
        "them.",
        ["batch", "PyTorch img/s", "ONNX Runtime img/s", "ONNX / PyTorch"],
        rows,
        readings,
        raw,
    )
