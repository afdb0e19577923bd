"""Subject-level train/val/test splits.

Splits that put one subject's cells on both sides of a split inflate every metric, the most
common error in published work on C-NMC. Every method here assigns whole subjects, stratified
by class, and :func:`check_subject_disjoint` guards the result. Identical files (same content
hash) filed under two subjects would leak the same way: :func:`label_conflicts` and
:func:`cross_split_copies` find the copies that must be left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from leukemia_mlops.data.layout import UNLABELLED
from leukemia_mlops.data.naming import LABEL_NAMES
from leukemia_mlops.errors import ConfigError, InputError

SPLITS = ("train", "val", "test")
#: Of identical images in several splits, the copy in the first of these is kept.
KEEP_ORDER = ("test", "val", "train")


class SubjectLeakError(InputError):
    """A subject's cells were found in more than one split."""


@dataclass(frozen=True)
class SplitSpec:
    """How to split the manifest.

    ``test``: ``prelim`` uses the labelled prelim-phase set (unseen subjects), ``subjects``
    holds out training subjects, ``auto`` takes prelim when present.
    ``val``: ``subjects`` holds out training subjects, ``fold`` uses official fold ``val_fold``
    for cross-validation over fold_0..2.
    """

    test: str = "auto"
    val: str = "subjects"
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    val_fold: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.test not in ("auto", "prelim", "subjects"):
            raise ConfigError(f"split.test must be auto, prelim or subjects, got {self.test!r}")
        if self.val not in ("subjects", "fold"):
            raise ConfigError(f"split.val must be subjects or fold, got {self.val!r}")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"split.{name} must be in (0, 1), got {getattr(self, name)}")


def assign_splits(manifest: pd.DataFrame, spec: SplitSpec) -> pd.Series:
    """A ``split`` value per row: train, val, test, or unlabelled (final-phase images)."""
    split = pd.Series("train", index=manifest.index, dtype="string")
    split[manifest["label"] == UNLABELLED] = "unlabelled"
    labelled = manifest["label"] != UNLABELLED
    has_prelim = bool((manifest["source_split"] == "prelim").any())
    if spec.test == "prelim" and not has_prelim:
        raise ConfigError("split.test=prelim but the dataset has no labelled prelim-phase set")
    test_from_prelim = spec.test == "prelim" or (spec.test == "auto" and has_prelim)
    if test_from_prelim:
        is_prelim = manifest["source_split"] == "prelim"
        split[is_prelim] = "test"
        pool = labelled & ~is_prelim
        val_fraction = spec.val_fraction
    else:
        held_out = _hold_out_subjects(manifest[labelled], spec.test_fraction, spec.seed)
        split[labelled & manifest["subject"].isin(held_out)] = "test"
        pool = labelled & (split == "train")
        val_fraction = spec.val_fraction / (1 - spec.test_fraction)
    if spec.val == "fold":
        folds = set(manifest.loc[pool, "fold"].dropna().astype(int))
        if spec.val_fold not in folds:
            raise ConfigError(f"split.val_fold={spec.val_fold} not among the folds {sorted(folds)}")
        split[pool & (manifest["fold"] == spec.val_fold)] = "val"
    else:
        held_out = _hold_out_subjects(manifest[pool], val_fraction, spec.seed + 1)
        split[pool & manifest["subject"].isin(held_out)] = "val"
    check_subject_disjoint(manifest.assign(split=split))
    return split


def _hold_out_subjects(rows: pd.DataFrame, fraction: float, seed: int) -> set[str]:
    """Pick about ``fraction`` of each class's subjects (at least one of each class)."""
    rng = np.random.default_rng(seed)
    subjects = rows.groupby("subject", sort=True)["label"].first()
    chosen: set[str] = set()
    for _, group in subjects.groupby(subjects, sort=True):
        names = group.index.to_numpy()
        if len(names) < 2:
            continue
        count = min(len(names) - 1, max(1, round(fraction * len(names))))
        chosen.update(rng.choice(names, size=count, replace=False).tolist())
    return chosen


def check_subject_disjoint(manifest: pd.DataFrame) -> None:
    """Raise :class:`SubjectLeakError` if any subject appears in two splits."""
    labelled = manifest[manifest["split"].isin(SPLITS)]
    per_subject = labelled.groupby("subject")["split"].nunique()
    leaked = per_subject[per_subject > 1].index.tolist()
    if leaked:
        raise SubjectLeakError(
            f"subjects in more than one split: {', '.join(map(str, leaked[:10]))}"
        )


def _shared_content(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows whose content hash occurs more than once (a group per image is slow)."""
    return rows[rows["content_hash"].duplicated(keep=False)]


def label_conflicts(manifest: pd.DataFrame) -> dict[int, str]:
    """Labelled rows whose content also appears with the other label, with the reason.

    Each copy names one identical file of the other label, so the pairs can be checked by hand.
    """
    labelled = manifest[manifest["label"] != UNLABELLED]
    reasons = {}
    for _, group in _shared_content(labelled).groupby("content_hash", sort=False):
        if group["label"].nunique() < 2:
            continue
        first = group.drop_duplicates("label").set_index("label")["path"]
        for index, label in group["label"].items():
            other = 1 - label
            reasons[index] = (
                f"identical to {first[other]} ({LABEL_NAMES[other]}) but labelled "
                f"{LABEL_NAMES[label]}: conflicting labels"
            )
    return reasons


def cross_split_copies(manifest: pd.DataFrame) -> dict[int, str]:
    """Rows whose content is also in an earlier split of :data:`KEEP_ORDER`, with the reason."""
    rank = manifest["split"].map({name: i for i, name in enumerate(KEEP_ORDER)})
    ranked = manifest[rank.notna()].assign(rank=rank).sort_values("rank", kind="stable")
    reasons = {}
    for _, group in _shared_content(ranked).groupby("content_hash", sort=False):
        kept = group.iloc[0]
        for index, split in zip(group.index, group["split"], strict=True):
            if split != kept["split"]:
                reasons[index] = f"identical to {kept['path']} in the {kept['split']} split"
    return reasons
