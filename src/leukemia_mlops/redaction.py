"""One redaction rule for every text the project prints, logs or writes.

Any ``scheme://user:password@host`` (tracking URI, Optuna storage URL, database URL) loses its
password before it reaches a log line, an error message, a config file or an MLflow param.
"""

from __future__ import annotations

import logging
import re
from typing import Any

_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@\s]*@")


def redact(text: str) -> str:
    """Hide passwords in URLs (``postgresql://user:secret@host`` -> ``user:***@host``)."""
    return _CREDENTIALS.sub(r"\g<scheme>\g<user>:***@", text)


def install_log_redaction() -> None:
    """Redact every log record this process creates, whichever logger or handler it reaches
    (Hydra's, MLflow's and Optuna's included), with its exception text."""
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
