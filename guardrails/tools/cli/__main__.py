"""``python -m guardrails.tools.cli``: the same as the ``guardrails`` console script."""

import sys

from guardrails.tools.cli.command import main

if __name__ == "__main__":
    sys.exit(main())
