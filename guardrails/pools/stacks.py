"""Where a connection was taken: a short stack of the app's own frames, for leak reports.

The walk skips the machinery (guardrails, the drivers, SQLAlchemy, asyncio, the server)
and keeps the first few frames of the app's code, cheaply enough to run on every
checkout while leak detection is on.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType
from typing import Any

__all__ = ["Frames", "capture_stack", "format_stack"]

_STACK_FRAMES = 3
_STACK_DEPTH = 64
_STACK_GAP = 4  # library frames in a row after the app's own that end the walk

# Frames of these top-level packages are machinery, not the code that took the
# connection; the stack shows the first few frames outside them.
_INTERNAL = frozenset(
    {
        "guardrails",
        "sqlalchemy",
        "asyncpg",
        "psycopg",
        "psycopg_pool",
        "anyio",
        "asyncio",
        "starlette",
        "fastapi",
        "greenlet",
        "contextlib",
        "concurrent",
        "threading",
        "uvicorn",
        "hypercorn",
        "h11",
        "httpx",
        "runpy",
        "_pytest",
        "pluggy",
    }
)
_internal_code: dict[CodeType, bool] = {}
_INTERNAL_CODE_KEPT = 4096

Frames = tuple[tuple[str, int, str], ...]


def _is_internal(frame: FrameType) -> bool:
    code = frame.f_code
    internal = _internal_code.get(code)
    if internal is None:
        module = frame.f_globals.get("__name__")
        module = module if isinstance(module, str) else ""
        internal = module.partition(".")[0] in _INTERNAL and not module.startswith(
            "guardrails.tools.demo"  # the demo app is user code as far as leaks go
        )
        if len(_internal_code) >= _INTERNAL_CODE_KEPT:
            _internal_code.clear()
        _internal_code[code] = internal
    return internal


def _parent_greenlet_frame() -> FrameType | None:
    # SQLAlchemy's asyncio layer runs pool code in a child greenlet whose stack ends at
    # the sync function it was given; the code awaiting it sits in the parent greenlet,
    # suspended in greenlet_spawn. greenlet is only looked at when already imported.
    module: Any = sys.modules.get("greenlet")
    if module is None:
        return None
    parent = module.getcurrent().parent
    if parent is None:
        return None
    frame: FrameType | None = parent.gr_frame
    return frame


def capture_stack(limit: int = _STACK_FRAMES, skip: int = 1) -> Frames:
    """The innermost ``limit`` frames of the caller's stack outside driver/library code.

    Walks ``sys._getframe`` (no source lines are read, nothing is formatted) and crosses
    from a greenlet into its parent once, so that code awaiting SQLAlchemy's async
    engine is found. Stops after ``limit`` frames, or at a run of library frames once
    the app's code has been found (the framework that called the app is not news).
    Returns ``(filename, lineno, function)`` tuples, innermost first.
    """
    found: list[tuple[str, int, str]] = []
    frame: FrameType | None = sys._getframe(skip)
    crossed = False
    internal_run = 0
    for _ in range(_STACK_DEPTH):
        if frame is None:
            if crossed:
                break
            crossed = True
            frame = _parent_greenlet_frame()
            continue
        if _is_internal(frame):
            internal_run += 1
            if found and internal_run > _STACK_GAP:
                break  # past the app's code, into the framework that called it
        else:
            internal_run = 0
            code = frame.f_code
            found.append((code.co_filename, frame.f_lineno, code.co_name))
            if len(found) >= limit:
                break
        frame = frame.f_back
    return tuple(found)


def format_stack(frames: Frames) -> str:
    """``"tests/test_x.py:12 in handler <- app.py:40 in main"``: short, one line."""
    if not frames:
        return "<unknown>"
    parts = []
    for filename, lineno, function in frames:
        head, tail = os.path.split(filename)
        short = os.path.join(os.path.basename(head), tail) if head else tail
        parts.append(f"{short}:{lineno} in {function}")
    return " <- ".join(parts)
