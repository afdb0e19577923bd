"""The sizes of a run and its scratch workspace: synthetic data, prepare caches, configs.

Everything is written under one temporary folder (never under ``data/``). Data sets and caches
are made once per run and shared, and so are measurements that several benchmarks quote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from leukemia_mlops.config import build_spec, compose
from leukemia_mlops.data.prepare import PrepareSpec, prepare_dataset
from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.data.synthetic import SyntheticSpec, generate_cnmc


@dataclass(frozen=True)
class Sizes:
    """How much every benchmark does; ``None`` means the value configured in ``conf/``."""

    quick: bool
    train_images: int | None  # synthetic images behind the training benchmarks
    image_size: int | None  # training size of the speed benchmarks
    sweep_size: int  # the precision/layout sweep of resnet18
    sweep_batch: int
    warmup: int  # batches before a clock starts measuring
    budget_s: float  # seconds a clock measures
    loop_rounds: int  # alternating rounds of the Lightning vs plain loop comparison
    loop_round_s: float  # seconds each loop measures in a round
    prep_images: int
    memory_images: tuple[int, int]
    predict_images: tuple[int, int, int]
    accuracy_images: int
    accuracy_size: int
    accuracy_epochs: int
    trial_epochs: int | None
    infer_batches: tuple[int, ...] = (1, 64)
    compile_backend: str = "inductor"  # quick: "eager" only captures graphs (no codegen)


FULL = Sizes(
    quick=False,
    train_images=None,
    image_size=None,
    sweep_size=224,
    sweep_batch=32,
    warmup=2,
    budget_s=10.0,  # the loop comparison has its own rounds: the whole run takes about 25 min
    loop_rounds=5,
    loop_round_s=20.0,
    prep_images=1000,
    memory_images=(500, 2000),
    predict_images=(1000, 10000, 30000),
    accuracy_images=300,
    accuracy_size=64,
    accuracy_epochs=3,
    trial_epochs=None,
)
QUICK = Sizes(
    quick=True,
    train_images=120,
    image_size=64,
    sweep_size=64,
    sweep_batch=8,
    warmup=1,
    budget_s=0.5,
    loop_rounds=2,
    loop_round_s=0.5,
    prep_images=100,
    memory_images=(100, 400),  # prepare starts worker processes from 64 images
    predict_images=(50, 100, 200),
    accuracy_images=100,
    accuracy_size=32,
    accuracy_epochs=1,
    trial_epochs=1,
    infer_batches=(1, 16),
    compile_backend="eager",
)


class Workspace:
    """Scratch data and configs under ``root``, made on first use and then reused."""

    def __init__(self, sizes: Sizes, root: Path):
        self.sizes, self.root = sizes, root
        self.defaults = compose()
        self._memo: dict[Hashable, Any] = {}

    @property
    def image_size(self) -> int:
        return self.sizes.image_size or int(self.defaults.data.prepare.image_size)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per run: data sets, and figures quoted by several benchmarks."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def scratch(self, name: str) -> Path:
        """A new path under the workspace, unique in this run."""
        return self.root / f"{name}{len(self._memo)}"

    def synthetic_spec(self, n_images: int | None = None) -> SyntheticSpec:
        """The configured synthetic data set, or one of about ``n_images`` labelled images."""
        spec = build_spec(SyntheticSpec, self.defaults.data.synthetic, "data.synthetic")
        if n_images is None:
            return spec
        subjects = spec.n_train_subjects + spec.n_prelim_subjects
        return dataclasses.replace(
            spec, cells_per_subject=max(1, round(n_images / subjects)), n_final_images=0
        )

    @property
    def train_spec(self) -> SyntheticSpec:
        return self.synthetic_spec(self.sizes.train_images)

    def raw(self, spec: SyntheticSpec) -> Path:
        """A raw synthetic C-NMC tree (BMP files in the Kaggle layout)."""

        def generate() -> Path:
            root = self.scratch("raw")
            generate_cnmc(root, spec, workers=0)
            return root

        return self.memo(("raw", spec), generate)

    def prepare_spec(self, image_size: int) -> PrepareSpec:
        spec = build_spec(PrepareSpec, self.defaults.data.prepare, "data.prepare")
        return dataclasses.replace(spec, image_size=image_size)

    def split_spec(self) -> SplitSpec:
        return build_spec(SplitSpec, self.defaults.data.split, "data.split")

    def prepared(self, spec: SyntheticSpec, image_size: int) -> Path:
        """The prepare cache of ``raw(spec)`` at ``image_size``, made with the configured stage."""

        def prepare() -> Path:
            raw, out = self.raw(spec), self.scratch("prepared")
            prepare_dataset(raw, out, self.prepare_spec(image_size), self.split_spec(), False)
            return out

        return self.memo(("prepared", spec, image_size), prepare)

    def config(self, prepared: Path, image_size: int, *overrides: str) -> DictConfig:
        """The configured run over ``prepared``, quiet, tracking into the workspace."""
        mlruns = self.root / "mlruns"
        mlruns.mkdir(parents=True, exist_ok=True)
        return compose(
            [
                f"paths.prepared_dir={prepared}",
                f"paths.mlruns_dir={mlruns}",
                f"paths.models_dir={self.root / 'models'}",
                f"paths.reports_dir={self.root / 'reports'}",
                f"logger.mlflow.tracking_uri=sqlite:///{mlruns / 'mlflow.db'}",
                f"data.prepare.image_size={image_size}",
                "trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                *overrides,
            ]
        )
