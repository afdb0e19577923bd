"""One redaction rule for every text the project prints, logs or writes.

Any ``scheme://user:password@host`` (tracking URI, Optuna storage URL, database URL) loses its
password before it reaches a log line, an error message, a config file or an MLflow param.
The running process keeps the real value: only what is written is redacted.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

# Also as Hydra escapes it in override text (``postgresql\://user\:pw@host``).
_CREDENTIALS = re.compile(
    r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*\\?://)(?P<user>[^:/@\s\\]*)(?P<colon>\\?:)[^@\s]*@"
)


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>\g<colon>***@", text)


class RedactingStream:
    """A text stream (``sys.stdout``, ``sys.stderr``) that redacts what is written to it:
    libraries print URLs too (MLflow's "View run ... at: <tracking URI>")."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        self.stream.write(redact(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def install_redaction() -> None:
    """Redact everything this process prints or logs from now on: ``sys.stdout``,
    ``sys.stderr``, and every log record, whichever logger or handler it reaches (Hydra's,
    MLflow's and Optuna's included), with its exception text."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    factory = logging.getLogRecordFactory()
    if getattr(factory, "redacts", False):
        return

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed call: logging reports it when the record is emitted
            return record
        record.msg, record.args = redact(message), None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return record

    make_record.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(make_record)


class RedactSecrets(Callback):
    """Hydra callback (``hydra.callbacks`` in ``conf/config.yaml``): redacts log records from
    the start of a run or sweep, and the ``.hydra/*.yaml`` files Hydra writes for every job
    (the command line's overrides and the composed config, a sweep trial's link to its
    study's storage among them) just after Hydra has saved them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_redaction()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        install_redaction()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.output_subdir is None:
            return
        folder = Path(config.hydra.runtime.output_dir) / config.hydra.output_subdir
        for path in folder.glob("*.yaml"):
            text = path.read_text()
            if redact(text) != text:
                path.write_text(redact(text))
