"""YOLOv3 package: shapes, published sizes, decoding/NMS, loss, training, Darknet weights I/O."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.ops import box_iou

from leukemia_mlops.models.yolo import (
    YoloConfig,
    YoloLoss,
    build,
    count_flops,
    count_params,
    decode,
    load_darknet_weights,
    postprocess,
    save_darknet_weights,
)
from leukemia_mlops.models.yolo.common import conv_layers

SMALL = {"yolov3": 0.125, "yolov3_tiny": 0.25}  # width_mult for fast CPU models


@pytest.fixture(autouse=True)
def _seed_and_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def small(variant: str, **cfg):
    return build({"variant": variant, "width_mult": SMALL[variant], **cfg})


def no_boxes() -> dict[str, torch.Tensor]:
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


@pytest.mark.parametrize(
    ("variant", "shapes"),
    [
        ("yolov3", [(2, 3, 12, 12, 7), (2, 3, 6, 6, 7), (2, 3, 3, 3, 7)]),
        ("yolov3_tiny", [(2, 3, 6, 6, 7), (2, 3, 3, 3, 7)]),
    ],
)
def test_output_shapes(variant, shapes):
    model, _ = small(variant)
    outputs = model(torch.randn(2, 3, 96, 96))
    assert [tuple(o.shape) for o in outputs] == shapes
    assert model.strides == tuple(96 // s[2] for s in shapes)
    assert model.anchors.shape == (len(shapes), 3, 2)
    assert count_params(model.backbone) < count_params(model)


def test_full_size_matches_published_figures():
    with torch.device("meta"):  # shapes only: no memory, no compute
        model, _ = build({"variant": "yolov3", "num_classes": 80})
        tiny, _ = build({"variant": "yolov3_tiny", "num_classes": 80})
    assert count_params(model.backbone) == pytest.approx(40.58e6, rel=0.01)
    assert count_params(model) == pytest.approx(61.95e6, rel=0.01)
    assert count_flops(model, 416) == pytest.approx(65.86e9, rel=0.01)
    assert count_params(tiny) == pytest.approx(8.85e6, rel=0.01)
    assert count_flops(tiny, 416) == pytest.approx(5.56e9, rel=0.01)


def darknet_file_bytes(module) -> int:
    """Size of a Darknet file holding ``module``: header, parameters and BN running stats."""
    running = sum(bn.running_mean.numel() * 2 for _, bn in conv_layers(module) if bn is not None)
    return 20 + 4 * (count_params(module) + running)


def test_darknet_layer_order_matches_cfg():
    with torch.device("meta"):
        model, _ = build({"variant": "yolov3", "num_classes": 80})
        tiny, _ = build({"variant": "yolov3_tiny", "num_classes": 80})
    # Sizes of the published files: yolov3.weights, darknet53.conv.74, yolov3-tiny.weights.
    assert darknet_file_bytes(model) == 248_007_048
    assert darknet_file_bytes(model.backbone) == 162_482_580
    assert darknet_file_bytes(tiny) == 35_434_956
    # Convolutions after the backbone, as (filters, size) in yolov3.cfg / yolov3-tiny.cfg order.
    head = [(c.out_channels, c.kernel_size[0]) for c, _ in model.darknet_layers()[52:]]
    scale = [(1, 1), (2, 3), (1, 1), (2, 3), (1, 1), (2, 3), (255, 1)]
    expected = [(512 * a if a < 3 else a, k) for a, k in scale]
    expected += [(256, 1)] + [(256 * a if a < 3 else a, k) for a, k in scale]
    expected += [(128, 1)] + [(128 * a if a < 3 else a, k) for a, k in scale]
    assert head == expected
    tiny_order = [(c.out_channels, c.kernel_size[0]) for c, _ in tiny.darknet_layers()]
    assert tiny_order == [(16 << i, 3) for i in range(7)] + [
        (256, 1),
        (512, 3),
        (255, 1),
        (128, 1),
        (256, 3),
        (255, 1),
    ]
    assert [bn is None for _, bn in model.darknet_layers()].count(True) == 3


# Two scales (strides 8, 16), one 40x40 px anchor each, two classes, 32 px input.
ANCHORS = torch.tensor([[[40.0, 40.0]], [[80.0, 80.0]]])
STRIDES = (8, 16)


def blank_outputs() -> list[torch.Tensor]:
    """Raw maps where every prediction has objectness ~0."""
    outputs = [torch.zeros(1, 1, 4, 4, 7), torch.zeros(1, 1, 2, 2, 7)]
    for o in outputs:
        o[..., 4] = -20.0
    return outputs


def set_cell(raw, j, i, obj, cls, tw=0.0):
    raw[0, 0, j, i, :4] = torch.tensor([0.0, 0.0, tw, tw])  # centre of the cell, anchor size
    raw[0, 0, j, i, 4] = obj
    raw[0, 0, j, i, 5:] = torch.tensor(cls)


def test_decode_known_cell_gives_known_box():
    outputs = blank_outputs()
    set_cell(outputs[0], j=2, i=1, obj=0.0, cls=[2.0, -2.0], tw=math.log(0.5))
    decoded = decode(outputs, ANCHORS, STRIDES)
    assert decoded.shape == (1, 16 + 4, 7)
    # centre ((0.5 + 1) * 8, (0.5 + 2) * 8) = (12, 20); size 40 * 0.5 = 20
    row = decoded[0, 2 * 4 + 1]
    torch.testing.assert_close(row[:4], torch.tensor([2.0, 10.0, 22.0, 30.0]))
    torch.testing.assert_close(row[4:], torch.sigmoid(torch.tensor([0.0, 2.0, -2.0])))
    # Second scale: cell (0, 1) with stride 16 and the 80 px anchor.
    outputs[1][0, 0, 0, 1, :4] = 0.0
    torch.testing.assert_close(
        decode(outputs, ANCHORS, STRIDES)[0, 16 + 1, :4], torch.tensor([-16.0, -32.0, 64.0, 48.0])
    )


def test_nms_is_class_aware():
    outputs = blank_outputs()
    set_cell(outputs[0], j=1, i=1, obj=6.0, cls=[6.0, -6.0])  # class 0, best
    set_cell(outputs[0], j=1, i=2, obj=3.0, cls=[6.0, -6.0])  # class 0, IoU 0.67 with best
    set_cell(outputs[0], j=2, i=1, obj=4.0, cls=[-6.0, 6.0])  # class 1, overlaps both
    (result,) = postprocess(outputs, ANCHORS, STRIDES, conf_threshold=0.1, iou_threshold=0.5)
    assert result["labels"].tolist() == [0, 1]
    torch.testing.assert_close(
        result["boxes"], torch.tensor([[-8.0, -8.0, 32.0, 32.0], [-8.0, 0.0, 32.0, 40.0]])
    )
    assert result["scores"].tolist() == sorted(result["scores"].tolist(), reverse=True)
    (capped,) = postprocess(outputs, ANCHORS, STRIDES, conf_threshold=0.1, max_detections=1)
    assert capped["labels"].tolist() == [0]


@pytest.mark.parametrize("box_loss", ["giou", "ciou", "xywh"])
def test_loss_with_and_without_boxes(box_loss):
    model, criterion = small("yolov3", box_loss=box_loss)
    outputs = model(torch.randn(2, 3, 64, 64))
    boxes = {"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0]]), "labels": torch.tensor([1])}
    total, parts = criterion(outputs, [boxes, no_boxes()])
    assert set(parts) == {"box", "obj", "cls"} and all(v > 0 for v in parts.values())
    total.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    total, parts = criterion(model(torch.randn(2, 3, 64, 64)), [no_boxes(), no_boxes()])
    assert torch.isfinite(total) and parts["box"] == 0 and parts["cls"] == 0 and parts["obj"] > 0


def synthetic_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Four 64 px images with blue (class 0) and red (class 1) rectangles on black."""
    scenes = [
        [((8, 8, 36, 40), 1)],
        [((30, 20, 58, 52), 0)],
        [((4, 6, 28, 30), 0), ((36, 34, 60, 60), 1)],
        [((10, 36, 50, 58), 1), ((40, 4, 60, 28), 0)],
    ]
    colours = torch.tensor([[0.2, 0.3, 1.0], [1.0, 0.2, 0.2]])
    images = torch.zeros(len(scenes), 3, 64, 64)
    targets = []
    for image, scene in zip(images, scenes, strict=True):
        for (x0, y0, x1, y1), label in scene:
            image[:, y0:y1, x0:x1] = colours[label][:, None, None]
        targets.append(
            {
                "boxes": torch.tensor([box for box, _ in scene], dtype=torch.float32),
                "labels": torch.tensor([label for _, label in scene]),
            }
        )
    return images, targets


def test_tiny_model_overfits_and_finds_the_boxes():
    images, targets = synthetic_batch()
    model, criterion = small("yolov3_tiny")
    optimiser = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(80):
        loss, _ = criterion(model(images), targets)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    model.eval()
    with torch.no_grad():
        results = postprocess(model(images), model.anchors, model.strides, conf_threshold=0.3)
    for result, target in zip(results, targets, strict=True):
        assert len(result["boxes"]) == len(target["boxes"])
        iou = box_iou(target["boxes"], result["boxes"])
        best = iou.argmax(1)
        assert (iou.max(1).values > 0.5).all()
        assert result["labels"][best].tolist() == target["labels"].tolist()


def randomise_bn_stats(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            torch.nn.init.uniform_(module.weight, 0.5, 1.5)
            torch.nn.init.uniform_(module.bias, -0.5, 0.5)


@pytest.mark.parametrize("variant", ["yolov3", "yolov3_tiny"])
def test_darknet_round_trip(tmp_path, variant):
    source, _ = small(variant)
    randomise_bn_stats(source)
    path = tmp_path / "model.weights"
    save_darknet_weights(source, path)
    torch.manual_seed(1)
    target, _ = small(variant)
    header = load_darknet_weights(target, path)
    assert (header.major, header.minor, header.seen) == (0, 2, 0)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    images = torch.randn(1, 3, 64, 64)
    source.eval()
    target.eval()
    with torch.no_grad():
        for a, b in zip(source(images), target(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def rewrite_header(path: Path, version: tuple[int, int, int], seen: np.ndarray) -> None:
    body = path.read_bytes()[20:]
    path.write_bytes(np.array(version, dtype="<i4").tobytes() + seen.tobytes() + body)


@pytest.mark.parametrize(
    ("version", "seen"),
    [((0, 1, 0), np.array([1234], "<i4")), ((0, 2, 5), np.array([2**40], "<i8"))],
)
def test_darknet_header_versions(tmp_path, version, seen):
    model, _ = small("yolov3_tiny")
    path = tmp_path / "model.weights"
    save_darknet_weights(model, path)
    rewrite_header(path, version, seen)
    header = load_darknet_weights(model, path)
    assert (header.major, header.minor, header.revision, header.seen) == (*version, seen[0])


def test_darknet_bad_files(tmp_path):
    model, _ = small("yolov3_tiny")
    missing = tmp_path / "missing.weights"
    with pytest.raises(FileNotFoundError, match=r"missing\.weights"):
        load_darknet_weights(model, missing)
    path = tmp_path / "model.weights"
    save_darknet_weights(model, path)
    expected = (path.stat().st_size - 20) // 4
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    with pytest.raises(ValueError, match=f"{expected - 10} float32 .* need {expected}"):
        load_darknet_weights(model, path)
    path.write_bytes(data + bytes(8))
    with pytest.raises(ValueError, match=f"{expected + 2} float32 .* need {expected}"):
        load_darknet_weights(model, path)
    path.write_bytes(data[:10])
    with pytest.raises(ValueError, match="not a Darknet weights file"):
        load_darknet_weights(model, path)


def test_darknet_cutoff_loads_only_the_backbone(tmp_path):
    source, _ = small("yolov3")
    randomise_bn_stats(source)
    backbone_file, full_file = tmp_path / "darknet53.conv.74", tmp_path / "yolov3.weights"
    save_darknet_weights(source.backbone, backbone_file)
    save_darknet_weights(source, full_file)
    cutoff = len(conv_layers(source.backbone))
    trained = source.state_dict()
    assert cutoff == 52
    for path in (backbone_file, full_file):  # a full file gives its backbone too
        torch.manual_seed(1)
        target, _ = small("yolov3")
        fresh = {k: v.clone() for k, v in target.state_dict().items()}
        load_darknet_weights(target, path, cutoff=cutoff)
        for name, value in target.state_dict().items():
            expected = trained[name] if name.startswith("backbone.") else fresh[name]
            torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=name)
    with pytest.raises(ValueError, match="need"):
        load_darknet_weights(target.backbone, full_file)  # too long without a cutoff


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"variant": "yolov4"}, "variant"),
        ({"img_size": 100}, "img_size"),
        ({"num_classes": 0}, "num_classes"),
        ({"anchors": [[[10, 13]], [[30, 61]]]}, "anchors"),
        ({"variant": "yolov3_tiny", "anchors": [[[10, 13], [5, 5]], [[30, 61]]]}, "anchors"),
        ({"anchors": [[[10, -1]], [[30, 61]], [[116, 90]]]}, "anchors"),
        ({"width_mult": 0}, "width_mult"),
        ({"box_loss": "l1"}, "box_loss"),
        ({"num_clases": 2}, "num_clases"),
    ],
)
def test_bad_config_values_raise(cfg, key):
    with pytest.raises(ValueError, match=key):
        build(cfg)


def test_config_defaults():
    cfg = YoloConfig(variant="yolov3_tiny")
    assert cfg.anchors == (((10, 14), (23, 27), (37, 58)), ((81, 82), (135, 169), (344, 319)))
    _, criterion = build(cfg)
    assert criterion.num_classes == 2 and criterion.strides == (16, 32)


def test_loss_assigns_the_best_anchor_at_the_centre_cell():
    outputs = blank_outputs()
    # Decodes to (2, 10, 22, 30): the 40 px anchor (shape IoU 0.25) beats the 80 px one (0.06).
    set_cell(outputs[0], j=2, i=1, obj=20.0, cls=[20.0, -20.0], tw=math.log(0.5))
    target = [{"boxes": torch.tensor([[2.0, 10.0, 22.0, 30.0]]), "labels": torch.tensor([0])}]
    total, parts = YoloLoss(ANCHORS, STRIDES, 2)(outputs, target)
    assert total < 1e-4, parts
    # Assigning every anchor above shape IoU 0.05 adds the 80 px anchor, which predicts nothing.
    total, parts = YoloLoss(ANCHORS, STRIDES, 2, anchor_threshold=0.05)(outputs, target)
    # Two positives: the obj logit -20 costs 20, blank class logits 2 * log(2); divided by 2.
    assert parts["obj"] == pytest.approx(10.0, rel=1e-3)
    assert parts["cls"] == pytest.approx(math.log(2), rel=1e-3)
