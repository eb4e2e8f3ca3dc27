"""The ASGI layer: the only part of guardrails that knows ASGI messages and scopes.

The middleware admits, queues or sheds each request; the health endpoint reports
the guard's state. Everything else in guardrails is plain Python.
"""
