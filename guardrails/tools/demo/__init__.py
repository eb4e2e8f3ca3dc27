"""``guardrails demo``: the same app under the same burst, without and then with guardrails.

This module is the CLI's entry point (flags and exit code) and stays light to import;
the work happens in :mod:`guardrails.tools.demo.runner`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

from guardrails.tools.demo.options import DemoError
from guardrails.tools.demo.options import add_arguments as add_arguments

__all__ = ["add_arguments", "run"]

_NEEDED = ("sqlalchemy", "aiosqlite", "greenlet", "uvicorn", "matplotlib")


def run(args: argparse.Namespace) -> int:
    """Run the demo with the flags ``add_arguments`` parsed; the process exit code."""
    needed = _NEEDED + (("asyncpg",) if args.database_url else ())
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"guardrails demo needs {', '.join(missing)}: "
            "pip install 'asgi-guardrails[demo]'" + (" asyncpg" if "asyncpg" in missing else ""),
            file=sys.stderr,
        )
        return 1
    from guardrails.tools.demo.runner import run_demo

    try:
        run_demo(args)
    except DemoError as exc:
        print(f"guardrails demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nguardrails demo: interrupted", file=sys.stderr)
        return 130
    return 0
