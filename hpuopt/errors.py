"""Typed errors. Every error names what is wrong; none is a bare ``Exception``."""

from __future__ import annotations


class HpuoptError(RuntimeError):
    """Base class of every error hpuopt raises on purpose."""


class ConfigError(HpuoptError, ValueError):
    """An option or ``HPUOPT_*`` variable is unknown or has a bad value."""


class PassError(HpuoptError):
    """A pass broke a graph invariant (raised in debug mode by the post-pass lint)."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"pass {pass_name!r}: {message}")
        self.pass_name = pass_name


class CaptureError(HpuoptError):
    """A piece could not be captured as a device graph.

    Raised by a runtime while capturing; the piece runner turns it into an uncaptured fallback
    (with the reason recorded) unless ``strict`` is set.
    """


class FallbackError(HpuoptError):
    """``strict`` mode: a piece would have run uncaptured. Names the piece, node and reason."""

    def __init__(self, piece: str, reason: str, node: str | None = None) -> None:
        where = f"piece {piece!r}" + (f" (node {node!r})" if node else "")
        super().__init__(f"strict mode: {where} cannot be captured: {reason}")
        self.piece = piece
        self.reason = reason
        self.node = node


class InputError(HpuoptError, TypeError):
    """An input the backend was given cannot be handled (names the input and why)."""
