"""What a prepare cache holds, written by ``prepare`` and checked by everything that reads it.

Training, sweeps and evaluation take the image size and the data version from the cache they
read, not from a config that may describe another cache: a Hydra run composed for 128 px
synthetic data must not train on a 224 px real-data cache and log it as the former.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import xxhash

from leukemia_mlops.errors import ConfigError, InputError

IDENTITY_FILE = "identity.json"


@dataclass(frozen=True)
class CacheIdentity:
    """The data a cache was made from and how: the run's data identity."""

    source: str | None  # data.source (synthetic | cnmc); None: not stated to prepare
    data_hash: str  # xxh3-128 over every cached image's path and content hash
    images: int
    image_size: int
    window: int
    fit: str

    def check(self, data_cfg: Any, cache_dir: str | Path) -> None:
        """Stop with one line if a config's ``data`` section describes another cache."""
        if data_cfg is None:
            return
        wanted = {"source": data_cfg.get("source")}
        wanted.update({k: data_cfg.get("prepare", {}).get(k) for k in ("image_size", "window")})
        wanted["fit"] = data_cfg.get("prepare", {}).get("fit")
        held = asdict(self)
        for key, value in wanted.items():
            if value is not None and held[key] is not None and value != held[key]:
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


def write_identity(cache_dir: str | Path, identity: CacheIdentity) -> None:
    """Record ``identity`` in the cache folder."""
    (Path(cache_dir) / IDENTITY_FILE).write_text(json.dumps(asdict(identity), indent=2) + "\n")


def read_identity(cache_dir: str | Path) -> CacheIdentity:
    """The identity ``prepare`` recorded; a cache without one is rebuilt, not guessed at."""
    path = Path(cache_dir) / IDENTITY_FILE
    if not path.is_file():
        raise InputError(f"{cache_dir} records no data identity: rebuild it (dvc repro prepare)")
    return CacheIdentity(**json.loads(path.read_text()))
