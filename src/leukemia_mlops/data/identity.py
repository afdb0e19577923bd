"""What a prepare cache holds, written by ``prepare`` and checked by everything that reads it.

Training, sweeps and evaluation take the image size and the data version from the cache they
read, not from a config that may describe another cache: a Hydra run composed for 128 px
synthetic data must not train on a 224 px real-data cache and log it as the former.

The identity's :attr:`~CacheIdentity.digest` covers the images, the prepare settings and the
split: two splits of one raw set are two identities, and only runs of one identity were
validated on the same images (``lmo-compare`` ranks within one).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd
import xxhash

from leukemia_mlops.data.splits import SplitSpec
from leukemia_mlops.errors import ConfigError, InputError
from leukemia_mlops.files import write_json

IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class CacheIdentity:
    """The data a cache was made from and how: the run's data identity (:attr:`digest`)."""

    source: str | None  # data.source (synthetic | cnmc); None: not stated to prepare
    data_hash: str  # xxh3-128 over every cached image's path and content hash
    images: int
    image_size: int
    window: int
    fit: str
    split: dict[str, Any]  # the data.split settings
    digest: str  # xxh3-128 over all of the above and each image's label and split

    def check(self, data_cfg: Any, cache_dir: str | Path) -> None:
        """Stop with one line if a config's ``data`` section describes another cache."""
        if data_cfg is None:
            return
        prepare, split = data_cfg.get("prepare") or {}, data_cfg.get("split") or {}
        wanted = {"source": data_cfg.get("source")}
        wanted |= {key: prepare.get(key) for key in ("image_size", "window", "fit")}
        wanted |= {f"split.{key}": value for key, value in split.items()}
        held = asdict(self) | {f"split.{key}": value for key, value in self.split.items()}
        for key, value in wanted.items():
            if value is not None and held.get(key) is not None and value != held[key]:
                raise ConfigError(
                    f"the config asks for data {key}={value} but {cache_dir} holds "
                    f"{key}={held[key]}: run `make repro` (or `dvc repro prepare`) for this config"
                )


def manifest_hash(manifest: pd.DataFrame) -> str:
    """A hash of the cached images: their relative paths and content hashes, order-free."""
    paths, contents = manifest["path"].astype(str), manifest["content_hash"].astype(str)
    pairs = sorted(zip(paths, contents, strict=True))
    digest = xxhash.xxh3_128()
    for path, content in pairs:
        digest.update(f"{path}\0{content}\n".encode())
    return digest.hexdigest()


def cache_identity(
    manifest: pd.DataFrame,
    source: str | None,
    image_size: int,
    window: int,
    fit: str,
    split: SplitSpec,
) -> CacheIdentity:
    """The identity of a cache holding ``manifest`` (its ``split`` column assigned)."""
    settings = {
        "source": source,
        "data_hash": manifest_hash(manifest),
        "images": len(manifest),
        "image_size": image_size,
        "window": window,
        "fit": fit,
        "split": asdict(split),
    }
    digest = xxhash.xxh3_128(json.dumps(settings, sort_keys=True).encode())
    # The assignment itself, so a change of the split code or of a label is a new identity.
    columns = (manifest[name].astype(str) for name in ("path", "label", "split"))
    for path, label, split_name in sorted(zip(*columns, strict=True)):
        digest.update(f"{path}\0{label}\0{split_name}\n".encode())
    return CacheIdentity(**settings, digest=digest.hexdigest())


def write_identity(cache_dir: str | Path, identity: CacheIdentity) -> None:
    """Record ``identity`` in the cache folder."""
    write_json(Path(cache_dir) / IDENTITY_FILE, asdict(identity), sort_keys=False)


def read_identity(cache_dir: str | Path) -> CacheIdentity:
    """The identity ``prepare`` recorded; a cache without one (or with one of an older layout,
    without the split) is rebuilt, not guessed at."""
    path = Path(cache_dir) / IDENTITY_FILE
    if not path.is_file():
        raise InputError(f"{cache_dir} records no data identity: rebuild it (dvc repro prepare)")
    held = json.loads(path.read_text())
    if {field.name for field in fields(CacheIdentity)} != set(held):
        raise InputError(
            f"{cache_dir} records a data identity of an older prepare: rebuild it "
            "(dvc repro prepare)"
        )
    return CacheIdentity(**held)
