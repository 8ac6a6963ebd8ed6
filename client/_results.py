"""Typed results of client calls (docs/PROTOCOL.md §5.8)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["InvokeResult"]


@dataclass(frozen=True, slots=True)
class InvokeResult:
    """One invocation's outcome. A non-zero ``exit_code`` is a result, not an error."""

    output: bytes
    stderr: bytes
    exit_code: int
    duration_us: int
    version: int
    truncated: bool = False
    queue_us: int = 0
    wall_us: int = 0
    memory_peak: int = 0
    mode: str = "wasm"

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> InvokeResult:
        """Build from an ``invoke`` result map; absent keys take neutral defaults."""
        return cls(
            output=bytes(result.get("output") or b""),
            stderr=bytes(result.get("stderr") or b""),
            exit_code=int(result.get("exit_code") or 0),
            duration_us=int(result.get("duration_us") or 0),
            version=int(result.get("version") or 0),
            truncated=bool(result.get("truncated", False)),
            queue_us=int(result.get("queue_us") or 0),
            wall_us=int(result.get("wall_us") or 0),
            memory_peak=int(result.get("memory_peak") or 0),
            mode=str(result.get("mode") or "wasm"),
        )

    @property
    def text(self) -> str:
        """``output`` decoded as UTF-8, undecodable bytes replaced."""
        return self.output.decode("utf-8", "replace")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready map: byte fields decoded as UTF-8 with replacement."""
        return {
            "output": self.text,
            "stderr": self.stderr.decode("utf-8", "replace"),
            "exit_code": self.exit_code,
            "version": self.version,
            "mode": self.mode,
            "truncated": self.truncated,
            "duration_us": self.duration_us,
            "queue_us": self.queue_us,
            "wall_us": self.wall_us,
            "memory_peak": self.memory_peak,
        }
