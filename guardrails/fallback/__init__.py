"""Fallback responses: which responses may be kept, under which key, and where.

A route with ``cache_ttl`` or ``stale_ttl`` keeps its last good response here, so
that a refusal can replay it (marked stale) instead of answering 503.
"""
