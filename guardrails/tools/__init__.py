"""The ``guardrails`` command line and what it runs: budget, doctor and the demo."""
