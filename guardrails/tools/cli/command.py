"""The top of the command line: the parser with its subcommands, and ``main``."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence

from guardrails.tools.cli import budget, doctor

__all__ = ["main"]

_DISTRIBUTION = "asgi-guardrails"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``guardrails`` command line with ``argv`` (default: ``sys.argv[1:]``).

    Returns the exit status instead of exiting, also for ``--help``, ``--version`` and
    bad flags, so it can be called in-process.
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        # argparse exits on --help, --version and bad input; hand back its status.
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _version() -> str:
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="guardrails",
        description="Keep Starlette and FastAPI apps alive when their database pool is "
        "under pressure.",
    )
    parser.add_argument("--version", action="version", version=f"guardrails {_version()}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    budget_parser = commands.add_parser("budget", help=budget.HELP, description=budget.DESCRIPTION)
    budget.add_arguments(budget_parser)
    budget_parser.set_defaults(handler=lambda args: budget.run(args, budget_parser))

    doctor_parser = commands.add_parser("doctor", help=doctor.HELP, description=doctor.DESCRIPTION)
    doctor.add_arguments(doctor_parser)
    doctor_parser.set_defaults(handler=doctor.run)

    demo = commands.add_parser(
        "demo",
        help="run the same app under the same burst, without and then with guardrails",
        description="Run an example app under a burst of requests, first without and "
        "then with guardrails, and compare. Needs the demo extra: "
        "pip install 'asgi-guardrails[demo]'.",
    )
    try:
        import guardrails.tools.demo
    except ImportError as exc:
        # A broken or missing demo must not take `guardrails budget` down with it.
        # (Bound as a default: Python unbinds `exc` when the except block ends.)
        demo.set_defaults(handler=lambda args, error=exc: _demo_unavailable(error))
    else:
        guardrails.tools.demo.add_arguments(demo)
        demo.set_defaults(handler=_run_demo)
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    import guardrails.tools.demo

    return guardrails.tools.demo.run(args)


def _demo_unavailable(exc: ImportError) -> int:
    print(f"guardrails demo: error: the demo cannot be imported: {exc}", file=sys.stderr)
    return 1
