"""The agent loop ``"agpo_single_turn"``: verl's single-turn loop, each sample at its own
sampling temperature.

verl's agent-loop worker builds one ``sampling_params`` dict from the rollout's single
``temperature``, and hands every non-tensor column of a prompt row to the loop as a keyword.
A row's ``agpo_temperature`` (the temperature controller's tau for the row's group) replaces
``temperature`` in that row's request only: vLLM's and SGLang's servers build their sampling
parameters per request, so each sample is drawn at its own temperature. Rows without the
field sample at the rollout's temperature. Select it with
``actor_rollout_ref.rollout.agent.default_agent_loop=agpo_single_turn`` (or a row's
``agent_name``).
"""

from __future__ import annotations

import math

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.single_turn_agent_loop import SingleTurnAgentLoop

TEMPERATURE_KEY = "agpo_temperature"
"""The prompt-row field with the row's sampling temperature."""
NAME = "agpo_single_turn"
"""The agent loop's name in verl's registry."""


@register(NAME)
class AGPOSingleTurnAgentLoop(SingleTurnAgentLoop):
    """``SingleTurnAgentLoop`` whose request takes the row's ``agpo_temperature``."""

    async def run(self, sampling_params, **kwargs):
        value = kwargs.get(TEMPERATURE_KEY)
        if value is not None:
            tau = float(value)
            if not (math.isfinite(tau) and tau > 0):
                raise ValueError(f"{TEMPERATURE_KEY}: expected a finite temperature > 0, got {value!r}")
            sampling_params = {**sampling_params, "temperature": tau}  # this request only
        return await super().run(sampling_params, **kwargs)
