"""Subject-level splits: no subject is ever in two splits, whatever the method."""

import pandas as pd
import pytest

from leukemia_mlops.data.layout import scan_dataset
from leukemia_mlops.data.splits import (
    SplitSpec,
    SubjectLeakError,
    assign_splits,
    check_subject_disjoint,
)

METHODS = [
    SplitSpec(),
    SplitSpec(test="subjects"),
    SplitSpec(val="fold", val_fold=1),
    SplitSpec(test="subjects", val="fold", val_fold=2, seed=5),
]


@pytest.fixture(scope="module")
def table(tiny_raw):
    return scan_dataset(tiny_raw)[0]


@pytest.mark.parametrize("spec", METHODS, ids=str)
def test_every_method_keeps_subjects_in_one_split(table, spec):
    split = assign_splits(table, spec)
    labelled = table.assign(split=split)[table["label"] != -1]
    assert (labelled.groupby("subject")["split"].nunique() == 1).all()
    for name in ("train", "val", "test"):
        classes = set(labelled.loc[labelled["split"] == name, "label"])
        assert classes == {0, 1}, f"{name} lacks a class"
    assert (split[table["label"] == -1] == "unlabelled").all()


@pytest.mark.parametrize("seed", range(5))
def test_subject_hold_outs_keep_each_class_in_proportion(seed):
    """30 HEM and 70 ALL subjects: every split holds 30% HEM subjects and cells, exactly."""
    subjects = [(f"h{i}", 0) for i in range(30)] + [(f"a{i}", 1) for i in range(70)]
    rows = [(name, label) for name, label in subjects for _ in range(3)]
    table = pd.DataFrame(rows, columns=["subject", "label"]).assign(source_split="train", fold=0)
    spec = SplitSpec(
        test="subjects", val="subjects", test_fraction=0.2, val_fraction=0.2, seed=seed
    )
    split = assign_splits(table, spec)
    per_split = table.assign(split=split).groupby("split")
    assert per_split["subject"].nunique().to_dict() == {"test": 20, "train": 60, "val": 20}
    hem_subjects = per_split.apply(lambda rows: rows.loc[rows["label"] == 0, "subject"].nunique())
    assert (hem_subjects / per_split["subject"].nunique()).to_dict() == pytest.approx(
        {"test": 0.3, "train": 0.3, "val": 0.3}
    )
    assert (1 - per_split["label"].mean()).to_dict() == pytest.approx(
        {"test": 0.3, "train": 0.3, "val": 0.3}
    )


def test_prelim_is_the_default_test_set_and_folds_give_validation(table):
    split = assign_splits(table, SplitSpec(val="fold", val_fold=1))
    assert (split[table["source_split"] == "prelim"] == "test").all()
    assert (split[table["fold"] == 1] == "val").all()


def test_splits_are_deterministic_and_seeded(table):
    spec = SplitSpec(test="subjects")
    assert assign_splits(table, spec).equals(assign_splits(table, spec))
    others = [assign_splits(table, SplitSpec(test="subjects", seed=s)) for s in range(1, 6)]
    assert any(not o.equals(assign_splits(table, spec)) for o in others)


def test_leak_check_names_the_subject():
    leaked = pd.DataFrame({"subject": ["1", "1", "2"], "split": ["train", "test", "val"]})
    with pytest.raises(SubjectLeakError, match="1"):
        check_subject_disjoint(leaked)


def test_official_folds_sharing_a_subject_are_refused(table):
    shared = table.copy()
    subject = shared.loc[shared["fold"] == 0, "subject"].iloc[0]
    first = shared.index[shared["subject"] == subject][0]
    shared.loc[first, "fold"] = 1
    with pytest.raises(SubjectLeakError):
        assign_splits(shared, SplitSpec(val="fold", val_fold=1))


@pytest.mark.parametrize(
    ("field", "value"),
    [("test", "random"), ("val", "cells"), ("val_fraction", 0.0), ("test_fraction", 1.5)],
)
def test_bad_split_values_are_clear_errors(field, value):
    with pytest.raises(ValueError, match=f"split.{field}"):
        SplitSpec(**{field: value})


def test_missing_prelim_or_fold_is_a_clear_error(table):
    without_prelim = table[table["source_split"] != "prelim"]
    with pytest.raises(ValueError, match="no labelled prelim"):
        assign_splits(without_prelim, SplitSpec(test="prelim"))
    with pytest.raises(ValueError, match="val_fold=7"):
        assign_splits(table, SplitSpec(val="fold", val_fold=7))
