"""Semaphores a probe needs raised besides its own.

CPython 3.11 tests ``python:function__entry``'s and ``function__return``'s
semaphores only on its tracing path, and it takes that path per instruction
only while ``python:line``'s semaphore is raised (its dispatch macro checks
``PyDTrace_LINE_ENABLED()``). Attached alone, those probes see just the calls
entered from C. So tracing them also raises ``python:line``'s semaphore,
without attaching to (or paying for) the line sites.

The rule is checked by feature: it applies only when the binary has the
companion probe and that probe has a semaphore.
"""

from __future__ import annotations

__all__ = ["COMPANIONS", "companions_of"]

COMPANIONS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("python", "function__entry"): (("python", "line"),),
    ("python", "function__return"): (("python", "line"),),
}


def companions_of(provider: str, name: str) -> tuple[tuple[str, str], ...]:
    """(provider, name) of the probes whose semaphores must also be raised."""
    return COMPANIONS.get((provider, name), ())
