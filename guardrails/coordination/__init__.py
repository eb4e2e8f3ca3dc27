"""Coordination among processes: one connection budget and one breaker for a fleet."""
