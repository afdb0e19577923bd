"""The pipeline's headline: the few numbers ``dvc metrics show`` and ``dvc exp show`` print.

Both pipeline models' numbers sit in one flat file under names of their own, because DVC heads
a name that two metrics files share with the file's path, and an 80-column terminal then shows
a single number. The numbers are those of the protocol every family is scored with (cell level,
on the test split), so experiments compare in the same columns whatever model they train:
``model`` (what experiments vary) shows its weighted F1 with the BCa 95% interval and AUROC,
first in ``dvc exp show``; ``detector`` (the model it is compared with) its F1 and AUROC under
``det_`` with the lower BCa bound of its AUROC (the guard's question: above 0.5?); then the
paired difference of their test AUROCs ``d_auroc`` (``model`` minus ``detector``) with its BCa
95% interval and the verdict it supports. They are rounded to three decimals, finer than any
interval here; each model's ``reports/eval/<key>/metrics.json`` holds the whole report (a
detector's box mAP included).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Per pipeline model key: the prefix of its names and the numbers it shows, in column order.
SHOWN = {
    "model": ("", ("f1", "f1_bca_low", "f1_bca_high", "auroc")),
    "detector": ("det_", ("f1", "auroc", "auroc_bca_low")),
}
DECIMALS = 3


def report_numbers(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The numbers a headline may show, from one evaluation report (``metrics.json``); an
    interval the test split is too small for is ``None``."""
    test = metrics["test"]
    return {
        "f1": test["f1_weighted"],
        "f1_bca_low": test.get("f1_weighted_bca_low"),
        "f1_bca_high": test.get("f1_weighted_bca_high"),
        "auroc": test["auroc"],
        "auroc_bca_low": test.get("auroc_bca_low"),
    }


def headline(
    reports: Mapping[str, Mapping[str, Any]], comparison: Mapping[str, Any] | None = None
) -> dict[str, float | str | None]:
    """The headline of the evaluated pipeline models (config key -> report), in column order,
    and of their paired ``comparison`` (see :mod:`leukemia_mlops.evaluation.paired`) if any."""
    shown: dict[str, float | str | None] = {}
    for key, metrics in reports.items():
        prefix, names = SHOWN[key]
        numbers = report_numbers(metrics)
        shown |= {prefix + name: _rounded(numbers[name]) for name in names}
    if comparison is not None:
        auroc = comparison["auroc"]
        shown |= {
            f"d_auroc{suffix}": _rounded(auroc.get(part))
            for suffix, part in (("", "point"), ("_bca_low", "bca_low"), ("_bca_high", "bca_high"))
        }
        shown["verdict"] = comparison["verdict"]
    return shown


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, DECIMALS)
