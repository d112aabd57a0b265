"""What the LangChain adapters share beyond ``guard_core``: the verdict event and how it is sent."""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import adispatch_custom_event, dispatch_custom_event
from langchain_core.runnables import RunnableConfig

from guard_core import Decision
from guard_core.steps import Step

#: Name of the custom event carrying every decision (``on_custom_event`` / ``astream_events``).
GUARD_EVENT = "qwen3guard_verdict"


def event_step(decision: Decision, config: RunnableConfig | None = None) -> Step[Any]:
    """Dispatch ``decision`` as the ``qwen3guard_verdict`` custom event of the current run (both forms)."""
    data = decision.to_dict()
    return Step(lambda: dispatch_custom_event(GUARD_EVENT, data, config=config),
                lambda: adispatch_custom_event(GUARD_EVENT, data, config=config))
