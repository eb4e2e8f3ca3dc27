"""Griffe extension for the API reference: Sphinx markup in docstrings becomes Markdown.

Docstrings name other objects the Sphinx way (``:class:`~guardrails.errors.Unavailable```),
which Markdown would show as is. Each role becomes inline code here, linked when it names
an object the reference renders under its public name (``guardrails.Unavailable``), so a
link keeps working when the module that defines the object moves. A line ending in
``::`` (before an indented example) ends in ``:``, as Sphinx shows it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

import guardrails
import guardrails.prometheus
import guardrails.testing

_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod|obj):`(~?)([^`<>]+)`")
_LITERAL_BLOCK = re.compile(r"(?<=\S)::$", re.MULTILINE)

# Public name -> the identifier it is rendered under on the reference page.
_RENDERED = (
    {name: f"guardrails.{name}" for name in guardrails.__all__}
    | {name: f"guardrails.prometheus.{name}" for name in guardrails.prometheus.__all__}
    | {name: f"guardrails.testing.{name}" for name in guardrails.testing.__all__}
)


def _markdown(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    last = target.rsplit(".", 1)[-1]
    # Only whole objects are linked (guardrails.errors.Unavailable, Policy); a member
    # (ConnectionBudget.app_total, snapshot) stays plain code.
    if last in _RENDERED and (target == last or target.startswith("guardrails.")):
        return f"[`{shown}`][{_RENDERED[last]}]"
    return f"`{shown}`"


class SphinxRoles(griffe.Extension):
    """Rewrites ``:role:`target``` in every docstring before it is rendered."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            text = _ROLE.sub(_markdown, obj.docstring.value)
            obj.docstring.value = _LITERAL_BLOCK.sub(":", text)
