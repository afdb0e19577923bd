"""YOLOv3 training loss: anchor-based target assignment, objectness/class BCE and a box term.

Assignment (as in YOLOv3): each ground-truth box goes to the anchor, over all scales, whose
shape (w, h) best overlaps it, at the grid cell holding the box centre; with
``anchor_threshold`` set, every other anchor whose shape IoU exceeds it is assigned too. Cells
whose decoded box already overlaps some ground truth by more than ``ignore_threshold`` are left
out of the no-object term, so near-misses are not pushed towards "background". One box per
anchor and cell: when several boxes of an image want the same one, the box listed last wins,
on every device (a max over box indices, not the unordered writes of indexed assignment).

Batches are padded to the most boxes of an image and every (box, anchor) pair is scored with
a 0/1 weight, so nothing is filtered by a mask: one host-device sync per call (a label check).

Every term is summed and divided by the number of assigned predictions (at least 1), so a batch
without boxes only trains objectness towards zero.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from leukemia_mlops.errors import ConfigError
from leukemia_mlops.models.yolo.postprocess import decode_boxes

BoxLoss = Literal["giou", "ciou", "xywh"]
BOX_LOSSES = ("giou", "ciou", "xywh")


def iou_loss(pred: Tensor, gt: Tensor, kind: BoxLoss, eps: float = 1e-7) -> Tensor:
    """Elementwise GIoU or CIoU loss of xyxy boxes ``[..., 4]``, with torchvision's formulas
    but no boolean masks (each of those is a host-device sync on a GPU)."""
    inter = torch.min(pred[..., 2:], gt[..., 2:]) - torch.max(pred[..., :2], gt[..., :2])
    inter = inter.clamp(min=0).prod(-1)
    size_pred, size_gt = pred[..., 2:] - pred[..., :2], gt[..., 2:] - gt[..., :2]
    union = size_pred.prod(-1) + size_gt.prod(-1) - inter
    iou = inter / (union + eps)
    enclosing = torch.max(pred[..., 2:], gt[..., 2:]) - torch.min(pred[..., :2], gt[..., :2])
    if kind == "giou":
        area = enclosing.prod(-1)
        return 1 - iou + (area - union) / (area + eps)
    centres = (pred[..., :2] + pred[..., 2:] - gt[..., :2] - gt[..., 2:]) / 2
    distance = centres.pow(2).sum(-1) / (enclosing.pow(2).sum(-1) + eps)
    aspect = torch.atan(size_gt[..., 0] / size_gt[..., 1])
    v = (4 / math.pi**2) * (aspect - torch.atan(size_pred[..., 0] / size_pred[..., 1])).pow(2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return 1 - iou + distance + alpha * v


class YoloLoss(nn.Module):
    """``loss(outputs, targets) -> (total, {"box", "obj", "cls"})``.

    ``outputs`` are the model's raw maps; ``targets`` has one dict per image with ``"boxes"``
    (``[N, 4]`` xyxy, input pixels) and ``"labels"`` (``[N]`` int64). Zero-area boxes are
    dropped. The parts are unweighted and detached, for logging; ``total`` is their weighted sum.
    ``box_loss`` "giou"/"ciou" are IoU losses on decoded boxes (:func:`iou_loss`); "xywh" is
    Darknet's regression: BCE on the centre offset, squared error on log size, scaled by
    ``2 - box area / image area``.
    """

    def __init__(
        self,
        anchors: Tensor | Sequence[Sequence[Sequence[float]]],
        strides: Sequence[int],
        num_classes: int,
        box_loss: BoxLoss = "giou",
        box_weight: float = 5.0,
        obj_weight: float = 1.0,
        cls_weight: float = 1.0,
        ignore_threshold: float = 0.5,
        anchor_threshold: float | None = None,
    ):
        super().__init__()
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
        self.register_buffer(
            "anchors", torch.as_tensor(anchors, dtype=torch.float32), persistent=False
        )
        self.strides = tuple(strides)
        self.num_classes = num_classes
        self.box_loss = box_loss
        self.weights = {"box": box_weight, "obj": obj_weight, "cls": cls_weight}
        self.ignore_threshold = ignore_threshold
        self.anchor_threshold = anchor_threshold

    def forward(
        self, outputs: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        if len(targets) != outputs[0].shape[0]:
            raise ValueError(f"{len(targets)} targets for a batch of {outputs[0].shape[0]}")
        boxes, labels, valid = self._pad(targets, outputs[0].device)
        matched = (
            self._match(boxes.flatten(0, 1)).unflatten(0, valid.shape) & valid[..., None, None]
        )
        classes = torch.arange(self.num_classes, device=labels.device)
        class_target = (labels[..., None, None] == classes).float()  # [B, M, 1, C]
        sums = dict.fromkeys(self.weights, outputs[0].new_zeros((), dtype=torch.float32))
        num_pos = outputs[0].new_zeros((), dtype=torch.float32)
        for scale, (raw, stride) in enumerate(zip(outputs, self.strides, strict=True)):
            raw = raw.float()
            pred_boxes = decode_boxes(raw, self.anchors[scale], stride)
            cell, positive = self._assign(raw.shape, stride, boxes, matched[:, :, scale])
            weight = positive.float()
            num_pos = num_pos + weight.sum()
            obj_target = raw.new_zeros(raw.shape[:-1]).flatten()
            obj_target = obj_target.scatter_reduce(0, cell.flatten(), weight.flatten(), "amax")
            obj_target = obj_target.view(raw.shape[:-1])
            obj_mask = ~self._ignored(pred_boxes.detach(), boxes, valid) | (obj_target > 0)
            obj = F.binary_cross_entropy_with_logits(raw[..., 4], obj_target, reduction="none")
            sums["obj"] = sums["obj"] + (obj * obj_mask).sum()
            # Every (box, anchor) pair of this scale is scored; only the positives weigh.
            pred = raw.flatten(0, 3)[cell]  # [B, M, A, 5 + C]
            box = self._box_term(
                pred, pred_boxes.flatten(0, 3)[cell], boxes, cell, scale, raw.shape
            )
            sums["box"] = sums["box"] + (box * weight).sum()
            cls = F.binary_cross_entropy_with_logits(
                pred[..., 5:], class_target.expand_as(pred[..., 5:]), reduction="none"
            )
            sums["cls"] = sums["cls"] + (cls.sum(-1) * weight).sum()
        parts = {name: value / num_pos.clamp_min(1) for name, value in sums.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}

    def _pad(
        self, targets: Sequence[dict[str, Tensor]], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Boxes ``[B, M, 4]``, labels ``[B, M]`` and validity ``[B, M]``, padded to the most
        boxes of an image. Padding and zero-area boxes are invalid and become a unit box with
        label 0, so every later step computes finite values without filtering anything."""
        boxes = pad_sequence(  # NaN padding fails the positive-size test below
            [t["boxes"].to(device, torch.float32).reshape(-1, 4) for t in targets],
            batch_first=True,
            padding_value=float("nan"),
        )
        labels = pad_sequence(
            [t["labels"].to(device, torch.int64).reshape(-1) for t in targets], batch_first=True
        )
        valid = (boxes[..., 2:] > boxes[..., :2]).all(-1)
        bad = valid & ((labels < 0) | (labels >= self.num_classes))
        if bad.any():  # the loss's one host-device sync
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {labels[valid].tolist()}"
            )
        unit = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
        return torch.where(valid[..., None], boxes, unit), labels * valid, valid

    def _match(self, boxes: Tensor) -> Tensor:
        """``[N, scales, anchors]`` mask of the anchors each box is assigned to by shape IoU."""
        num_scales, num_anchors, _ = self.anchors.shape
        anchors = self.anchors.view(-1, 2)
        wh = boxes[:, 2:] - boxes[:, :2]
        inter = torch.min(wh[:, None], anchors[None]).prod(-1)
        iou = inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
        matched = torch.zeros_like(iou, dtype=torch.bool).scatter_(1, iou.argmax(1, True), True)
        if self.anchor_threshold is not None:
            matched |= iou > self.anchor_threshold
        return matched.view(-1, num_scales, num_anchors)

    @staticmethod
    def _assign(
        shape: torch.Size, stride: int, boxes: Tensor, matched: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Flat cell index ``[B, M, A]`` into the ``[B, A, H, W]`` map of every (box, anchor)
        pair at the cell holding the box centre, and which pairs are positives.

        One box per anchor and cell: when several boxes of an image land on the same one, the
        box listed last wins (a max over box indices, which is deterministic on every device).
        """
        batch, num_anchors, h, w, _ = shape
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        i = (centre[..., 0] / stride).floor().long().clamp(0, w - 1)
        j = (centre[..., 1] / stride).floor().long().clamp(0, h - 1)
        b = torch.arange(batch, device=boxes.device)[:, None, None]
        a = torch.arange(num_anchors, device=boxes.device)
        cell = ((b * num_anchors + a) * h + j[..., None]) * w + i[..., None]
        order = torch.arange(boxes.shape[1], device=boxes.device)[:, None].expand_as(cell)
        owner = torch.full((batch * num_anchors * h * w,), -1, device=boxes.device)
        owner = owner.scatter_reduce(
            0, cell.flatten(), torch.where(matched, order, -1).flatten(), "amax"
        )
        return cell, matched & (owner[cell] == order)

    def _ignored(self, pred_boxes: Tensor, boxes: Tensor, valid: Tensor) -> Tensor:
        """``[B, A, H, W]`` mask of predictions overlapping some ground truth above threshold."""
        pred = pred_boxes.flatten(1, 3)[:, :, None]  # [B, P, 1, 4] against [B, 1, M, 4]
        gt = boxes[:, None]
        inter = torch.min(pred[..., 2:], gt[..., 2:]) - torch.max(pred[..., :2], gt[..., :2])
        inter = inter.clamp(min=0).prod(-1)
        area = (pred[..., 2:] - pred[..., :2]).prod(-1) + (gt[..., 2:] - gt[..., :2]).prod(-1)
        overlaps = (inter / (area - inter)) > self.ignore_threshold
        return (overlaps & valid[:, None]).any(-1).view(pred_boxes.shape[:-1])

    def _box_term(
        self, raw: Tensor, pred: Tensor, gt: Tensor, cell: Tensor, scale: int, shape: torch.Size
    ) -> Tensor:
        """Box loss ``[B, M, A]`` of every (box, anchor) pair: ``raw``/``pred`` ``[B, M, A, .]``
        are the predictions at the pair's ``cell`` of the raw map of ``scale`` (of ``shape``),
        ``gt`` ``[B, M, 4]`` the boxes."""
        gt = gt[:, :, None].expand_as(pred)
        if self.box_loss != "xywh":
            return iou_loss(pred, gt, self.box_loss)
        _, _, h, w, _ = shape
        stride = self.strides[scale]
        size = gt[..., 2:] - gt[..., :2]
        cell_xy = torch.stack([cell % w, cell // w % h], -1).float()
        offset = ((gt[..., :2] + gt[..., 2:]) / (2 * stride) - cell_xy).clamp(0, 1)
        xy = F.binary_cross_entropy_with_logits(raw[..., :2], offset, reduction="none").sum(-1)
        wh = (raw[..., 2:4] - (size / self.anchors[scale]).log()).pow(2).sum(-1)
        image_area = h * w * stride**2
        return (xy + wh) * (2 - size.prod(-1) / image_area)
