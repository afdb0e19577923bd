"""What the served model takes from a request row: image bytes under a pixel limit, and file
paths only under a root the deployment names.

Over the network a client sends image bytes. A ``path`` names a file on the *server*, so it is
refused unless the deployment names an allowed root, and then read only where it resolves
(symlinks and ``..`` followed, the file required to exist) inside that root. Every refused path
gets one and the same message, so a client learns nothing of the server's files: not whether
one exists, nor what it is.

An image's pixel count is read from its header alone (PIL's ``Image.open`` parses the header
and decodes nothing until ``load``), so an image above the limit (a small PNG of 8000 x 8000
black pixels is a 192 MB decompression bomb) is refused before any decoder allocates it.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from leukemia_mlops.errors import ConfigError, InputError

#: The most pixels (width x height) of an image the served model decodes: 16 megapixels, far
#: above a C-NMC cell (450 x 450) or a composed scene, far below a decompression bomb.
DEFAULT_MAX_PIXELS = 4096 * 4096
#: Deployment settings: environment variables of the server, over the model's ``model_config``.
MAX_PIXELS_ENV, ALLOWED_ROOT_ENV = "LMO_SERVE_MAX_PIXELS", "LMO_SERVE_ALLOWED_ROOT"
#: ``model_config`` keys of the same settings.
MAX_PIXELS_KEY, ALLOWED_ROOT_KEY = "max_pixels", "allowed_root"
#: The one answer to every refused path (outside the root, missing, a folder, no root named).
PATH_REFUSED = "path refused: this server reads only files under its allowed root"


class Refused(InputError):
    """A request row the served model does not score; its message is the row's error."""


@dataclass(frozen=True)
class Intake:
    """The deployment's limits: the largest image in pixels, and the root paths may name
    (None: paths are refused, only image bytes are taken)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_root: Path | None = None

    def __post_init__(self) -> None:
        if self.max_pixels < 1:
            raise ConfigError(f"{MAX_PIXELS_KEY} must be >= 1, got {self.max_pixels}")
        if self.allowed_root is not None and not self.allowed_root.is_dir():
            raise ConfigError(f"{ALLOWED_ROOT_KEY} is not a folder: {self.allowed_root}")

    @classmethod
    def of(cls, config: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> Intake:
        """The settings of a deployment: its environment's, else the model's ``config``."""
        pixels = environ.get(MAX_PIXELS_ENV) or config.get(MAX_PIXELS_KEY) or DEFAULT_MAX_PIXELS
        root = environ.get(ALLOWED_ROOT_ENV) or config.get(ALLOWED_ROOT_KEY)
        try:
            max_pixels = int(pixels)
        except ValueError:
            raise ConfigError(f"{MAX_PIXELS_ENV} must be an integer, got {pixels!r}") from None
        return cls(max_pixels, None if root is None else Path(root))

    def image_bytes(self, encoded: str) -> bytes:
        """The bytes of a base64 ``image``, refused unless they are an image within the limit."""
        try:
            data = base64.b64decode(encoded, validate=True)
        except binascii.Error as err:
            raise Refused(f"'image' is not base64 ({err})") from None
        check_pixels(data, self.max_pixels)
        return data

    def path(self, given: str) -> Path:
        """The file a ``path`` names, resolved, if it lies under the allowed root; else
        :data:`PATH_REFUSED`, whatever the reason. A relative path is taken from the root."""
        if self.allowed_root is None:
            raise Refused(PATH_REFUSED)
        root = self.allowed_root.resolve()
        try:
            resolved = (root / given).resolve(strict=True)
        except (OSError, RuntimeError, ValueError):  # missing, a symlink loop, a NUL byte
            raise Refused(PATH_REFUSED) from None
        if not resolved.is_relative_to(root) or not resolved.is_file():
            raise Refused(PATH_REFUSED)
        return resolved


def check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuse ``data`` unless its header names an image of at most ``max_pixels``; nothing is
    decoded (PIL reads the header, and pixels only on ``load``)."""
    if not data:
        raise Refused("empty image")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Image.DecompressionBombError:  # PIL's own guard, from the header too
        raise Refused(f"image has more pixels than the limit of {max_pixels:,}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise Refused("not an image (its header is not one of a known format)") from None
    if width * height > max_pixels:
        raise Refused(
            f"image of {width} x {height} pixels is above the limit of {max_pixels:,} pixels"
        )
