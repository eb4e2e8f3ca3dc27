"""``python -m guardrails``: the same command line as the ``guardrails`` console script."""

import sys

from guardrails.tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
