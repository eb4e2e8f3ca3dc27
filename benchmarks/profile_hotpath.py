"""Profile one in-process case of the overhead benchmark with pyinstrument.

pyinstrument is not a dependency of the project: ``.venv/bin/pip install pyinstrument``.
Prints the call tree of the chosen case (default: the admitted path) for many requests.

    .venv/bin/python benchmarks/profile_hotpath.py [--case admitted] [--requests 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import overhead


async def _drive(case: overhead.Case, requests: int) -> None:
    app = case.build()
    await overhead.per_request_ns(app, case.path, 500)
    await overhead.per_request_ns(app, case.path, requests)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(overhead.CASES), default="admitted")
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--interval", type=float, default=0.0001, help="sampling interval (s)")
    args = parser.parse_args(argv)
    try:
        from pyinstrument import Profiler
    except ImportError:
        print("needs pyinstrument: .venv/bin/pip install pyinstrument", file=sys.stderr)
        return 2
    overhead.quiet()
    profiler = Profiler(interval=args.interval, async_mode="disabled")
    with profiler:
        asyncio.run(_drive(overhead.CASES[args.case], args.requests))
    print(profiler.output_text(unicode=True, color=False, show_all=False, short_mode=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
