"""Child process for the memory benchmark: run one stage, then print its peak RSS as JSON.

``python -m bench.peak_rss prepare RAW OUT PREPARE_SPEC_JSON SPLIT_SPEC_JSON``,
``python -m bench.peak_rss train CONFIG_YAML`` or
``python -m bench.peak_rss predict RAW OUT_CSV IMAGE_SIZE``. A fresh process per
measurement, so that the peak belongs to that stage alone. Imports stay inside the stages:
the prepare stage does not load torch, and its peak should not carry it.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import sys
from pathlib import Path


def own_peak_kib() -> int:
    """``VmHWM``: this process's peak RSS. Its ``ru_maxrss`` would not do: Linux carries the
    peak of the process that started it across ``exec``, here the much larger benchmark runner.
    """
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))


def peak_mib() -> dict[str, float]:
    """Peak RSS of this process and of its largest child (pool or loader worker), in MiB.

    Children count once reaped, so any still running (persistent loader workers) are ended
    first; they were forked, not exec'd, so their ``ru_maxrss`` (KiB on Linux) is their own.
    """
    for child in multiprocessing.active_children():
        child.terminate()
        child.join()
    return {
        "main": own_peak_kib() / 1024,
        "worker": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def prepare(raw: str, out: str, prepare_spec: str, split_spec: str) -> None:
    from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
    from leukemia_mlops.data.splits import SplitSpec

    spec = PrepareSpec(**json.loads(prepare_spec))
    prepare_dataset(raw, out, spec, SplitSpec(**json.loads(split_spec)), progress=False)


def train(config: str) -> None:
    """One epoch through the project's Lightning path, without validation."""
    from omegaconf import OmegaConf

    from bench.loops import fit_lightning
    from bench.run import quiet

    quiet()
    fit_lightning(OmegaConf.load(config), [], max_epochs=1)


def predict(raw: str, out_csv: str, image_size: str) -> None:
    """``predict`` over every file under ``raw`` with an untrained resnet18 (its memory does
    not depend on the weights)."""
    from leukemia_mlops.inference.predict import predict_paths
    from leukemia_mlops.inference.scorers import TorchScorer
    from leukemia_mlops.models.backbones import build_classifier

    size = int(image_size)
    scorer = TorchScorer(build_classifier("resnet18"), preprocessing={"image_size": size})
    predict_paths(scorer, [raw], out_csv, image_size=size)


if __name__ == "__main__":
    stage, *args = sys.argv[1:]
    {"prepare": prepare, "train": train, "predict": predict}[stage](*args)
    print(json.dumps(peak_mib()))
