"""YOLOv3 and YOLOv3-tiny at 416 px: training and inference images/s, size vs Darknet's figures."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from bench.ceiling import cpu_peaks, native_precisions, synchronizer
from bench.report import Section, pct, verdict
from bench.timing import BatchClock, rate_of
from bench.workspace import Workspace
from leukemia_mlops.models.yolo import build, count_flops, count_params

TITLE = "YOLOv3 at 416 px: speed, parameters and FLOPs"
IMG_SIZE = 416
#: Darknet's published figures at 416 px with 80 classes: parameters and GFLOPs (2 x MACs).
PUBLISHED = {"yolov3": (61_949_149, 65.86), "yolov3_tiny": (8_852_366, 5.56)}


def _size_check(variant: str) -> tuple[int, float]:
    with torch.device("meta"):
        model, _ = build({"variant": variant, "num_classes": 80, "img_size": IMG_SIZE})
    return count_params(model), count_flops(model, IMG_SIZE) / 1e9


def yolo_rates(
    variant: str, img_size: int, batch: int, device: str, clock: Callable[[], BatchClock]
) -> tuple[float, float]:
    """Training (forward, loss, backward, AdamW) and inference images/s, 2 classes.

    bf16 autocast on a GPU that runs it natively, fp32 elsewhere."""
    model, criterion = build({"variant": variant, "num_classes": 2, "img_size": img_size})
    model = model.to(device)
    images = torch.rand(batch, 3, img_size, img_size, device=device)
    box = torch.tensor([[0.3, 0.25, 0.7, 0.7]], device=device) * img_size
    targets = [{"boxes": box, "labels": torch.tensor([1], device=device)} for _ in range(batch)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bf16 = "bf16" in native_precisions(device) and device == "cuda"
    sync = synchronizer(device)

    def train_step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss, _ = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        sync()
        return batch

    def infer_step() -> int:
        with torch.inference_mode(), torch.autocast(device, torch.bfloat16, enabled=bf16):
            model(images)
        sync()
        return batch

    model.train()
    train = rate_of(train_step, clock())
    model.eval()
    infer = rate_of(infer_step, clock())
    return train.per_s, infer.per_s


def run(ws: Workspace) -> Section:
    peak = cpu_peaks(ws)["fp32"]
    rows, readings, raw = [], [], {"peak_gflops": peak}
    for variant, (params_ref, gflops_ref) in PUBLISHED.items():
        params, gflops = _size_check(variant)
        batch = 2 if ws.sizes.budget_s < 5 else 4
        clock = partial(BatchClock, ws.sizes.warmup, ws.sizes.budget_s)
        train, infer = yolo_rates(variant, IMG_SIZE, batch, "cpu", clock)
        rows.append(
            [
                variant,
                params,
                params_ref,
                gflops,
                gflops_ref,
                train,
                infer,
                pct(3 * gflops * train / peak),
                pct(gflops * infer / peak),
            ]
        )
        readings.append(verdict(f"{variant} parameters vs Darknet", params / params_ref, 0.99))
        readings.append(verdict(f"{variant} GFLOPs vs Darknet", gflops / gflops_ref, 0.99))
        raw[variant] = {
            "params": params,
            "gflops": gflops,
            "train_img_s": train,
            "infer_img_s": infer,
        }
    return Section(
        TITLE,
        f"Images/s of a training step (forward, loss, backward, AdamW) and of inference at "
        f"{IMG_SIZE} px, fp32, all {torch.get_num_threads()} threads, against the fp32 peak "
        f"(the ceiling section's faster dense kernel) measured in the same run ({peak:.0f} "
        "GFLOP/s); parameters and GFLOPs (80 classes, 2 x multiply-adds) against Darknet's "
        "published figures.",
        [
            "model",
            "params",
            "published",
            "GFLOPs",
            "published",
            "train img/s",
            "infer img/s",
            "train of peak",
            "infer of peak",
        ],
        rows,
        readings,
        raw,
    )
