"""C-NMC 2019 cell file names: ``UID_<subject>_<image>_<cell>_<all|hem>.bmp``.

A leading ``H`` on the subject number marks a healthy subject (``UID_H10_43_1_hem.bmp``).
Every cell of a subject carries that subject's label, so a name whose ``H`` and class disagree
is refused: a parsed subject can never hold both labels.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from leukemia_mlops.errors import InputError
from leukemia_mlops.labels import ALL, HEM

LABEL_NAMES = {ALL: "all", HEM: "hem"}
LABELS_BY_NAME = {name: label for label, name in LABEL_NAMES.items()}

_NAME = re.compile(
    r"^UID_(?P<healthy>H?)(?P<subject>\d+)_(?P<image>\d+)_(?P<cell>\d+)_(?P<cls>all|hem)$",
    re.IGNORECASE,
)


NAME_FORMAT = "UID_<subject>_<image>_<cell>_<all|hem>"


class CellNameError(InputError):
    """A file name that does not follow the C-NMC naming scheme; the message is the reason."""


@dataclass(frozen=True)
class CellName:
    """The parts of a C-NMC file name."""

    subject: str
    image_id: int
    cell_id: int
    label: int

    @property
    def file_name(self) -> str:
        return format_cell_name(self.subject, self.image_id, self.cell_id, self.label)


def parse_cell_name(file_name: str) -> CellName:
    """Parse a C-NMC file name (with or without extension) into its parts."""
    stem = file_name.rsplit(".", 1)[0] if "." in file_name else file_name
    match = _NAME.match(stem)
    if match is None:
        raise CellNameError(f"file name not of the form {NAME_FORMAT}")
    label = LABELS_BY_NAME[match["cls"].lower()]
    healthy = bool(match["healthy"])
    subject = f"H{int(match['subject'])}" if healthy else str(int(match["subject"]))
    if healthy != (label == HEM):
        raise CellNameError(
            f"subject {subject} is {'' if healthy else 'not '}marked healthy (H) "
            f"but the cell is {LABEL_NAMES[label]}"
        )
    return CellName(subject, int(match["image"]), int(match["cell"]), label)


def format_cell_name(subject: str, image_id: int, cell_id: int, label: int) -> str:
    """The C-NMC file name of one cell; the inverse of :func:`parse_cell_name`."""
    return f"UID_{subject}_{image_id}_{cell_id}_{LABEL_NAMES[label]}.bmp"
