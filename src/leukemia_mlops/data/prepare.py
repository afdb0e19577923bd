"""The ``prepare`` stage: decode every raw image once into a memory-mappable training cache.

Outputs, all under ``out_dir`` and written to a temporary folder first (a killed run leaves
the previous cache or none, never a half one):

* ``images.npy``: uint8 array ``[N, size, size, 3]`` (RGB), opened with ``mmap_mode="r"``;
* ``manifest.parquet``: one row per cached image (row ``i`` is ``images[i]``) with its path,
  label, subject, fold, source split, content hash (xxh3-128), file size, original size, cell
  box and assigned split;
* ``skipped.csv``: every file left out, with the reason;
* a marker file (:data:`leukemia_mlops.owned.MARKER`): the next run may replace this folder.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pandas as pd
import xxhash
from tqdm import tqdm

from leukemia_mlops.data.identity import cache_identity, write_identity
from leukemia_mlops.data.images import (
    ImageDecodeError,
    bgr_to_rgb,
    cell_box,
    decode_bgr,
    to_training_image,
)
from leukemia_mlops.data.layout import Skip, scan_dataset
from leukemia_mlops.data.splits import (
    SPLITS,
    SplitSpec,
    assign_splits,
    cross_split_copies,
    label_conflicts,
)
from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.owned import check_replaceable, claim, remove_owned

IMAGES_FILE, MANIFEST_FILE, SKIPPED_FILE = "images.npy", "manifest.parquet", "skipped.csv"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareSpec:
    """How raw images become training images (see :func:`to_training_image`)."""

    image_size: int = 128
    window: int = 450
    fit: str = "window"
    workers: int = 0  # 0: one per CPU core

    def __post_init__(self) -> None:
        if self.image_size < 16:
            raise ConfigError(f"prepare.image_size must be >= 16, got {self.image_size}")
        if self.window < self.image_size // 4:
            raise ConfigError(f"prepare.window is too small: {self.window}")
        if self.fit not in ("window", "box"):
            raise ConfigError(f"prepare.fit must be 'window' or 'box', got {self.fit!r}")
        if self.workers < 0:
            raise ConfigError(f"prepare.workers must be >= 0, got {self.workers}")


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray | None
    content_hash: str = ""
    size_bytes: int = 0
    height: int = 0
    width: int = 0
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    reason: str = ""


def decode_file(path: Path, spec: PrepareSpec) -> Decoded:
    """Read, hash and decode one file as ``prepare`` does (``predict`` shares it).

    Failures come back as a reason, not an exception, so one bad file never stops a run.
    """
    try:
        data = path.read_bytes()
        image = decode_bgr(data)
    except (OSError, ImageDecodeError) as err:
        return Decoded(None, reason=str(err))
    box = cell_box(image)
    if box is None:
        return Decoded(None, reason="blank image (no cell pixels)")
    pixels = bgr_to_rgb(to_training_image(image, spec.image_size, spec.window, spec.fit, box))
    content_hash = xxhash.xxh3_128_hexdigest(data)
    return Decoded(pixels, content_hash, len(data), *image.shape[:2], box)


#: Files per task: few enough to balance the processes, enough to open the cache once per many.
CHUNK_FILES = 32

#: (cache file, spec, [(cache row, raw file), ...]): one unit of work for a decode process.
Chunk = tuple[Path, PrepareSpec, list[tuple[int, Path]]]


def _decode_chunk(chunk: Chunk) -> list[tuple[int, Decoded]]:
    """Decode files straight into their rows of the memory-mapped cache.

    Only the small per-file records travel back to the parent process, never the pixels.
    """
    cache_path, spec, files = chunk
    cache = np.load(cache_path, mmap_mode="r+")
    results = []
    for row, path in files:
        decoded = decode_file(path, spec)
        if decoded.pixels is not None:
            cache[row] = decoded.pixels
        results.append((row, replace(decoded, pixels=None)))
    del cache
    return results


def _decode_all(
    cache_path: Path, files: list[Path], spec: PrepareSpec, progress: bool
) -> Iterator[tuple[int, Decoded]]:
    """Every file's record, in completion order, once its pixels are in the cache."""
    rows = list(enumerate(files))
    chunks = [
        (cache_path, spec, rows[start : start + CHUNK_FILES])
        for start in range(0, len(rows), CHUNK_FILES)
    ]
    workers = min(spec.workers or os.cpu_count() or 1, len(chunks))
    with tqdm(total=len(files), desc="prepare", unit="img", disable=not progress) as bar:
        for done in _map_chunks(chunks, workers):
            bar.update(len(done))
            yield from done


def _map_chunks(chunks: list[Chunk], workers: int) -> Iterator[list[tuple[int, Decoded]]]:
    if workers == 1:
        yield from map(_decode_chunk, chunks)
        return
    with Pool(workers) as pool:
        yield from pool.imap_unordered(_decode_chunk, chunks)


def prepare_dataset(
    raw_dir: str | Path,
    out_dir: str | Path,
    spec: PrepareSpec,
    split: SplitSpec,
    progress: bool = True,
    source: str | None = None,
) -> dict:
    """Build the cache under ``out_dir`` and return the data report (see :func:`data_report`).

    The cache records its :class:`~leukemia_mlops.data.identity.CacheIdentity` (``source`` is
    the config's ``data.source``): the images, ``spec`` and ``split``.

    An existing ``out_dir`` is replaced only if ``prepare`` wrote it (see :mod:`owned`).
    """
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if out_dir == raw_dir or raw_dir in out_dir.parents or out_dir in raw_dir.parents:
        raise ConfigError(f"prepare output {out_dir} must lie outside the raw data {raw_dir}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    # A cache written before the marker existed is proved by its manifest (or, half-written,
    # by its images file).
    check_replaceable(out_dir, out_dir / MANIFEST_FILE)
    check_replaceable(tmp, tmp / IMAGES_FILE)
    table, skipped = scan_dataset(raw_dir)
    if table.empty:
        raise InputError(f"no usable images under {raw_dir} ({_count_reasons(skipped)})")
    remove_owned(tmp, tmp / IMAGES_FILE)
    claim(tmp)
    try:
        manifest = _write_cache(raw_dir, table, skipped, spec, split, tmp, progress)
        identity = cache_identity(manifest, source, spec.image_size, spec.window, spec.fit, split)
        write_identity(tmp, identity)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_owned(out_dir, out_dir / MANIFEST_FILE)
    os.replace(tmp, out_dir)
    return data_report(manifest, skipped, spec, split)


def _count_reasons(skipped: list[Skip]) -> str:
    """``3 files skipped: 2 <reason>, 1 <reason>``, the most common reasons first."""
    counts = pd.Series([s.reason for s in skipped], dtype="string").value_counts()
    listed = ", ".join(f"{count} {reason}" for reason, count in counts.head(3).items())
    return f"{len(skipped)} files skipped" + (f": {listed}" if listed else "")


def _write_cache(
    raw_dir: Path,
    table: pd.DataFrame,
    skipped: list[Skip],
    spec: PrepareSpec,
    split: SplitSpec,
    tmp: Path,
    progress: bool,
) -> pd.DataFrame:
    """Decode into ``tmp``, leave out what must not be used, write and return the manifest.

    Left out, with the reason added to ``skipped``: undecodable files, identical images with
    conflicting labels (pair by pair), and copies of an image already in another split.
    """
    size = spec.image_size
    cache_path = tmp / IMAGES_FILE
    np.lib.format.open_memmap(cache_path, "w+", np.uint8, (len(table), size, size, 3))
    paths = table["path"].tolist()
    records = dict(_decode_all(cache_path, [raw_dir / p for p in paths], spec, progress))
    left_out = {row: records[row].reason for row in sorted(records) if records[row].reason}
    decoded = [row for row in sorted(records) if row not in left_out]
    if not decoded:
        undecodable = len(skipped) + len(left_out)
        raise InputError(f"no image under {raw_dir} could be decoded ({undecodable} skipped)")
    manifest = _with_image_columns(table.loc[decoded], [records[row] for row in decoded])
    conflicts = label_conflicts(manifest)
    for row, reason in conflicts.items():
        log.warning("left out %s: %s", paths[row], reason)
    manifest = manifest.drop(index=list(conflicts))
    manifest["split"] = assign_splits(manifest, split)
    copies = cross_split_copies(manifest)
    manifest = manifest.drop(index=list(copies))
    left_out |= conflicts | copies
    skipped.extend(Skip(paths[row], left_out[row]) for row in sorted(left_out))
    if len(manifest) < len(table):
        _compact_cache(cache_path, manifest.index.tolist())
    manifest = manifest.reset_index(drop=True)
    manifest.to_parquet(tmp / MANIFEST_FILE, index=False)
    pd.DataFrame(skipped, columns=["path", "reason"]).to_csv(tmp / SKIPPED_FILE, index=False)
    return manifest


def _compact_cache(path: Path, rows: list[int]) -> None:
    """Rewrite the cache with only the given rows, in order (drops skipped files' empty rows)."""
    full = np.load(path, mmap_mode="r")
    short_path = path.with_suffix(".short.npy")
    short = np.lib.format.open_memmap(short_path, "w+", np.uint8, (len(rows), *full.shape[1:]))
    for index, row in enumerate(rows):
        short[index] = full[row]
    del short, full
    os.replace(short_path, path)


def _with_image_columns(manifest: pd.DataFrame, rows: list[Decoded]) -> pd.DataFrame:
    boxes = np.array([d.box for d in rows], dtype=np.int64).reshape(-1, 4)
    return manifest.assign(
        content_hash=[d.content_hash for d in rows],
        size_bytes=np.array([d.size_bytes for d in rows], dtype=np.int64),
        height=np.array([d.height for d in rows], dtype=np.int64),
        width=np.array([d.width for d in rows], dtype=np.int64),
        box_x0=boxes[:, 0],
        box_y0=boxes[:, 1],
        box_x1=boxes[:, 2],
        box_y1=boxes[:, 3],
    )


def data_report(
    manifest: pd.DataFrame, skipped: list[Skip], spec: PrepareSpec, split: SplitSpec
) -> dict:
    """Images and subjects per split and class, skipped files by reason, duplicate content."""
    report: dict = {"images": len(manifest), "skipped": len(skipped)}
    for name in SPLITS:
        rows = manifest[manifest["split"] == name]
        report[name] = {
            "images": len(rows),
            "subjects": int(rows["subject"].nunique()),
            "all_images": int((rows["label"] == 1).sum()),
            "hem_images": int((rows["label"] == 0).sum()),
            "all_subjects": int(rows.loc[rows["label"] == 1, "subject"].nunique()),
            "hem_subjects": int(rows.loc[rows["label"] == 0, "subject"].nunique()),
        }
    report["unlabelled"] = int((manifest["split"] == "unlabelled").sum())
    report["duplicate_images"] = int(manifest["content_hash"].duplicated().sum())
    reasons = pd.Series([s.reason for s in skipped], dtype="string")
    report["skipped_by_reason"] = {k: int(v) for k, v in reasons.value_counts().items()}
    report["prepare"] = asdict(spec)
    report["split_spec"] = asdict(split)
    return report
