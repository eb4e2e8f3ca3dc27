"""The ``guardrails`` command: ``guardrails budget`` sizes a connection budget before a deploy.

``guardrails doctor`` wires its flags to :mod:`guardrails.tools.doctor`; ``guardrails demo`` is
delegated to :mod:`guardrails.tools.demo`, imported only when needed. Exit status: 0 fine, 1 the
pool does not fit the budget, a checklist item warns or the demo failed, 2 bad input.

Each subcommand has its own module (:mod:`~guardrails.tools.cli.budget`,
:mod:`~guardrails.tools.cli.doctor`) that adds its flags and runs it; the flag types and the
budget flags both share are in :mod:`~guardrails.tools.cli.flags`.
"""

from guardrails.tools.cli.command import main

__all__ = ["main"]
