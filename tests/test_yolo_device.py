"""YOLO on any device: a device-free exported graph, deterministic target assignment, few
host-device syncs per training step, channels-last."""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from torch.utils._python_dispatch import TorchDispatchMode

from leukemia_mlops.models.detector import DecodedYolo, YoloDetector
from leukemia_mlops.models.yolo import YoloLoss, build
from leukemia_mlops.tracking.model_logging import log_classifier

SMALL = {"variant": "yolov3_tiny", "img_size": 64, "width_mult": 0.25}
aten = torch.ops.aten
# Ops that make the host wait for a GPU: reading a value back, or sizing an output by its data.
SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), int(t), bool(t), float(t)
    aten.nonzero,
    aten.masked_select,
    aten.equal,
    aten.is_nonzero,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
}


class SyncCounter(TorchDispatchMode):
    """Counts the ops of a CPU run that synchronise host and device on a GPU.

    Boolean-mask indexing counts too (it runs ``nonzero`` inside its kernel). Ops called from
    torchmetrics (its input validation) are left out: they are not the detector's.
    """

    def __init__(self) -> None:
        super().__init__()
        self.own: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(
        self, func: torch._ops.OpOverload, types: Any, args: tuple = (), kwargs: Any = None
    ) -> Any:
        packet = func.overloadpacket
        masked = packet in (aten.index, aten.index_put, aten.index_put_) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
        )
        if packet in SYNC_OPS or masked:
            self.record(str(func))
        return func(*args, **(kwargs or {}))

    def record(self, name: str) -> None:
        import traceback

        if not any("/torchmetrics/" in frame.filename for frame in traceback.extract_stack()):
            self.own[name] += 1


@contextmanager
def count_syncs() -> Iterator[SyncCounter]:
    """A :class:`SyncCounter` that also counts ``Tensor.tolist`` (which copies to the host)."""
    counter = SyncCounter()
    tolist = torch.Tensor.tolist

    def counted(tensor: torch.Tensor) -> list:
        counter.record("tolist")
        return tolist(tensor)

    torch.Tensor.tolist = counted
    try:
        with counter:
            yield counter
    finally:
        torch.Tensor.tolist = tolist


def batch(device: str = "cpu") -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Four 64 px images: single cells, a scene with two cells, an image without boxes."""
    boxes = [[[4.0, 6.0, 30.0, 40.0]], [[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 60.0]], [], []]
    labels = [[1], [1, 0], [], []]
    image_labels = [1, -1, 0, 0]
    targets = [
        {
            "boxes": torch.tensor(b, device=device).reshape(-1, 4),
            "labels": torch.tensor(c, dtype=torch.int64, device=device),
            "image_label": torch.tensor(i, device=device),
        }
        for b, c, i in zip(boxes, labels, image_labels, strict=True)
    ]
    return torch.rand(4, 3, 64, 64, device=device), targets


def device_nodes(graph: torch.fx.Graph) -> list[str]:
    """Nodes of an exported graph that name a device in their arguments."""
    return [
        node.format_node()
        for node in graph.nodes
        if any(isinstance(v, torch.device) for v in (*node.args, *node.kwargs.values()))
    ]


def test_exported_detector_has_no_device_in_its_graph():
    torch.manual_seed(0)
    net = DecodedYolo(YoloDetector(**SMALL).net).eval()
    images = torch.rand(2, 3, 64, 64)
    program = torch.export.export(
        net, (images,), dynamic_shapes=[{0: torch.export.Dim.AUTO}]
    )  # as MLflow's pt2 format exports it
    assert device_nodes(program.graph) == []
    # The graph follows its weights: on the meta device, a CPU constant would fail.
    moved = program.module().to("meta")
    assert moved(images[:1].to("meta")).shape == (1, 3 * (4 * 4 + 2 * 2), 7)


def test_logged_detector_loads_on_another_device(tmp_path):
    torch.manual_seed(0)
    detector = YoloDetector(**SMALL)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("yolo", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLflow's notes on environments and pickles
        log_classifier(uri, run_id, detector.predictor(), 64)
        served = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert device_nodes(served.graph) == []
    images = torch.rand(3, 3, 64, 64)
    expected = served(images)
    device = "cuda" if torch.cuda.is_available() else "meta"
    moved = served.to(device)(images.to(device))
    assert moved.shape == expected.shape and moved.device.type == device
    if device == "cuda":
        torch.testing.assert_close(moved.cpu(), expected, rtol=1e-3, atol=1e-3)


# One 40 px anchor per scale (strides 8, 16), two classes, a 32 px input.
ANCHORS = torch.tensor([[[40.0, 40.0]], [[80.0, 80.0]]])


def test_colliding_boxes_the_last_listed_wins():
    outputs = [torch.full((1, 1, 4, 4, 7), -20.0), torch.full((1, 1, 2, 2, 7), -20.0)]
    # Cell (i=1, j=2) predicts (2, 10, 22, 30) as a sure class 0.
    outputs[0][0, 0, 2, 1] = torch.tensor([0.0, 0.0, math.log(0.5), math.log(0.5), 20, 20, -20])
    exact = [2.0, 10.0, 22.0, 30.0]
    other = [3.0, 11.0, 21.0, 29.0]  # same cell, same anchor, class 1
    loss = YoloLoss(ANCHORS, (8, 16), 2)

    def parts(boxes: list[list[float]], labels: list[int]) -> dict[str, torch.Tensor]:
        target = {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}
        return loss(outputs, [target])[1]

    won = parts([other, exact], [1, 0])
    assert won["box"] < 1e-6 and won["cls"] < 1e-6 and won["obj"] < 1e-6
    lost = parts([exact, other], [0, 1])
    assert lost["cls"] == pytest.approx(40.0, rel=1e-3)  # two logits wrong by 20 each
    assert lost["obj"] < 1e-6  # still exactly one positive at that cell


def test_training_step_syncs_host_and_device_at_most_twice():
    torch.manual_seed(0)
    detector = YoloDetector(**SMALL)
    images, targets = batch()
    with count_syncs() as syncs:
        outputs = detector(images)
        total, _ = detector.criterion(outputs, targets)
        total.backward()
    assert sum(syncs.own.values()) <= 1, syncs.own  # the label check
    with count_syncs() as syncs:
        detector.training_step((images, targets), 0).backward()
    # The loss's label check and the count of single-cell images; torchmetrics adds its own.
    assert sum(syncs.own.values()) <= 2, syncs.own


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_step_syncs_on_cuda():
    torch.manual_seed(0)
    detector = YoloDetector(**SMALL).cuda()
    images, targets = batch("cuda")
    detector.criterion(detector(images), targets)[0].backward()  # warm-up: lazy CUDA init
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            detector.criterion(detector(images), targets)[0].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) <= 1, [str(w.message) for w in syncs]


def test_detector_is_channels_last():
    torch.manual_seed(0)
    detector = YoloDetector(**SMALL)
    convs = [m for m in detector.net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    images, _ = detector.on_after_batch_transfer((batch()[0].mul(255).byte(), []), 0)
    assert images.is_contiguous(memory_format=torch.channels_last)
    reference, _ = build({"variant": "yolov3_tiny", "width_mult": 0.25})
    reference.load_state_dict(detector.net.state_dict())
    detector.eval()
    reference.eval()
    with torch.no_grad():
        for a, b in zip(detector(images), reference(images.contiguous()), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
