"""Observability: telemetry events and counters, triage of pool trouble, metrics export."""
