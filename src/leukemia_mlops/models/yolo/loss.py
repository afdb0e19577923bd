"""YOLOv3 training loss: anchor-based target assignment, objectness/class BCE and a box term.

Assignment (as in YOLOv3): each ground-truth box goes to the anchor, over all scales, whose
shape (w, h) best overlaps it, at the grid cell holding the box centre; with
``anchor_threshold`` set, every other anchor whose shape IoU exceeds it is assigned too. Cells
whose decoded box already overlaps some ground truth by more than ``ignore_threshold`` are left
out of the no-object term, so near-misses are not pushed towards "background".

Every term is summed and divided by the number of assigned predictions (at least 1), so a batch
without boxes only trains objectness towards zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, complete_box_iou_loss, generalized_box_iou_loss

from leukemia_mlops.models.yolo.postprocess import decode_boxes

BoxLoss = Literal["giou", "ciou", "xywh"]
BOX_LOSSES = ("giou", "ciou", "xywh")


class YoloLoss(nn.Module):
    """``loss(outputs, targets) -> (total, {"box", "obj", "cls"})``.

    ``outputs`` are the model's raw maps; ``targets`` has one dict per image with ``"boxes"``
    (``[N, 4]`` xyxy, input pixels) and ``"labels"`` (``[N]`` int64). Zero-area boxes are
    dropped. The parts are unweighted and detached, for logging; ``total`` is their weighted sum.
    ``box_loss`` "giou"/"ciou" use torchvision's IoU losses on decoded boxes; "xywh" is
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
            raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
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
        image_ids, boxes, labels = self._gather(targets, outputs[0].device)
        gt_scale, gt_anchor, gt_index = self._match(boxes)
        sums = dict.fromkeys(self.weights, outputs[0].new_zeros((), dtype=torch.float32))
        num_pos = 0
        for scale, (raw, stride) in enumerate(zip(outputs, self.strides, strict=True)):
            raw = raw.float()
            pred_boxes = decode_boxes(raw, self.anchors[scale], stride)
            in_scale = gt_scale == scale
            pos, g = self._cells(
                raw, stride, image_ids, boxes, gt_anchor[in_scale], gt_index[in_scale]
            )
            obj_target = torch.zeros_like(raw[..., 4])
            obj_target[pos] = 1.0
            obj_mask = ~self._ignored(pred_boxes.detach(), image_ids, boxes)
            obj_mask[pos] = True
            sums["obj"] = sums["obj"] + F.binary_cross_entropy_with_logits(
                raw[..., 4][obj_mask], obj_target[obj_mask], reduction="sum"
            )
            if g.numel():
                num_pos += g.numel()
                _, a, j, i = pos
                cell = torch.stack([i, j], 1).to(raw.dtype)
                image_area = raw.shape[2] * raw.shape[3] * stride**2
                sums["box"] = sums["box"] + self._box_term(
                    raw[pos],
                    pred_boxes[pos],
                    boxes[g],
                    self.anchors[scale][a],
                    cell,
                    stride,
                    image_area,
                )
                class_target = F.one_hot(labels[g], self.num_classes).to(raw.dtype)
                sums["cls"] = sums["cls"] + F.binary_cross_entropy_with_logits(
                    raw[pos][:, 5:], class_target, reduction="sum"
                )
        parts = {name: value / max(num_pos, 1) for name, value in sums.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}

    def _gather(
        self, targets: Sequence[dict[str, Tensor]], device: torch.device
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Concatenate all images' non-degenerate boxes with their image index."""
        image_ids, boxes, labels = [], [], []
        for i, target in enumerate(targets):
            b = target["boxes"].to(device, torch.float32).reshape(-1, 4)
            keep = (b[:, 2:] > b[:, :2]).all(1)
            boxes.append(b[keep])
            labels.append(target["labels"].to(device, torch.int64).reshape(-1)[keep])
            image_ids.append(torch.full((int(keep.sum()),), i, device=device))
        labels_cat = torch.cat(labels)
        if (
            labels_cat.numel()
            and not 0 <= int(labels_cat.min()) <= int(labels_cat.max()) < self.num_classes
        ):
            raise ValueError(
                f"labels must lie in [0, {self.num_classes}), got {labels_cat.tolist()}"
            )
        return torch.cat(image_ids), torch.cat(boxes), labels_cat

    def _match(self, boxes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(scale, anchor, box index) of every box-anchor pair assigned by shape IoU."""
        num_scales, num_anchors, _ = self.anchors.shape
        anchors = self.anchors.view(-1, 2)
        wh = boxes[:, 2:] - boxes[:, :2]
        inter = torch.min(wh[:, None], anchors[None]).prod(-1)
        iou = inter / (wh.prod(-1)[:, None] + anchors.prod(-1)[None] - inter)
        matched = F.one_hot(iou.argmax(1), num_scales * num_anchors).bool()
        if self.anchor_threshold is not None:
            matched |= iou > self.anchor_threshold
        index, flat_anchor = matched.nonzero(as_tuple=True)
        return flat_anchor // num_anchors, flat_anchor % num_anchors, index

    @staticmethod
    def _cells(
        raw: Tensor, stride: int, image_ids: Tensor, boxes: Tensor, anchor: Tensor, index: Tensor
    ) -> tuple[tuple[Tensor, ...], Tensor]:
        """Positive cells ``(b, a, j, i)`` and their box indices; one box per cell, the last
        one written wins when several boxes land on the same anchor and cell."""
        batch, num_anchors, h, w, _ = raw.shape
        centre = (boxes[index, :2] + boxes[index, 2:]) / 2
        i = (centre[:, 0] / stride).floor().long().clamp(0, w - 1)
        j = (centre[:, 1] / stride).floor().long().clamp(0, h - 1)
        b = image_ids[index]
        key = ((b * num_anchors + anchor) * h + j) * w + i
        owner = torch.full((batch * num_anchors * h * w,), -1, device=raw.device)
        order = torch.arange(key.numel(), device=raw.device)
        owner[key] = order
        keep = owner[key] == order
        return (b[keep], anchor[keep], j[keep], i[keep]), index[keep]

    def _ignored(self, pred_boxes: Tensor, image_ids: Tensor, boxes: Tensor) -> Tensor:
        """``[B, A, H, W]`` mask of predictions overlapping some ground truth above threshold."""
        ignored = torch.zeros(pred_boxes.shape[:-1], dtype=torch.bool, device=pred_boxes.device)
        for b in range(pred_boxes.shape[0]):
            gt = boxes[image_ids == b]
            if gt.numel():
                best = box_iou(pred_boxes[b].reshape(-1, 4), gt).amax(1)
                ignored[b] = (best > self.ignore_threshold).view(ignored.shape[1:])
        return ignored

    def _box_term(
        self,
        raw: Tensor,
        pred: Tensor,
        gt: Tensor,
        anchors: Tensor,
        cell: Tensor,
        stride: int,
        image_area: float,
    ) -> Tensor:
        """Summed box loss of the positives (``raw``/``pred``/``gt`` rows line up)."""
        if self.box_loss == "giou":
            return generalized_box_iou_loss(pred, gt, reduction="sum")
        if self.box_loss == "ciou":
            return complete_box_iou_loss(pred, gt, reduction="sum")
        size = gt[:, 2:] - gt[:, :2]
        offset = ((gt[:, :2] + gt[:, 2:]) / (2 * stride) - cell).clamp(0, 1)
        xy = F.binary_cross_entropy_with_logits(raw[:, :2], offset, reduction="none").sum(1)
        wh = (raw[:, 2:4] - (size / anchors).log()).pow(2).sum(1)
        return ((xy + wh) * (2 - size.prod(1) / image_area)).sum()
