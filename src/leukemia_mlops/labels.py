"""The two classes a cell belongs to, by label: HEM (healthy, 0) and ALL (leukaemic blast, 1).

Every package names them from here: the C-NMC file names (``data.naming``, lower case), the
datasets' profiles, the metrics, plots and the detector's boxes.
"""

from __future__ import annotations

ALL, HEM = 1, 0
#: Each class's name, indexed by its label.
CLASS_NAMES = ("HEM", "ALL")
