"""Server logs: human lines (the default) or JSON lines (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final, TextIO

__all__ = ["JsonFormatter", "setup_logging"]

HUMAN_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: What every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD: Final = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``msg``, the record's extra
    fields (an access line's ``op``, ``tenant``, ``function``, ``code``, ``duration_ms``...),
    and ``exc`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc:
                doc[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    """``time LEVEL logger: message``, the time's seconds formatted once per second: an access
    line per request must stay cheap (a few microseconds)."""

    def __init__(self) -> None:
        super().__init__(HUMAN_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._stamp},{int(record.msecs):03d}"


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes info and debug lines in batches, every ``FLUSH_EVERY_S`` or 64 KiB, warnings and
    worse (and everything before them) at once.

    An access line per request, written one ``write`` each, cost a serving process its latency
    under load: the soak's echo p99 went from 12 ms to 175 ms with ~1,000 lines a second (each
    write gives up the GIL, and the guest threads take it). Batched, it is one write per tenth
    of a second. A process killed with SIGKILL loses at most that tenth's info lines.
    """

    FLUSH_EVERY_S: Final = 0.1
    MAX_BUFFER: Final = 64 * 1024

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._buffer: list[str] = []
        self._size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_forever, name="fnserver-log", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]
            self._buffer.append(line)
            self._size += len(line)
            urgent = record.levelno >= logging.WARNING or self._size >= self.MAX_BUFFER
        if urgent:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if not self._buffer:
                return
            text, self._buffer, self._size = "".join(self._buffer), [], 0
            try:
                self.stream.write(text)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr closed or gone: nothing left to tell

    def close(self) -> None:
        self._stop.set()
        self.flush()
        super().close()

    def _flush_forever(self) -> None:
        while not self._stop.wait(self.FLUSH_EVERY_S):
            self.flush()


def setup_logging(level: str, fmt: str) -> None:
    """Configure the root logger on stderr."""
    # The logging HOWTO's "Optimization": no caller lookup (a stack walk per record), no
    # thread or multiprocessing names; records keep the pid (JSON lines carry it).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = BufferedStreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
