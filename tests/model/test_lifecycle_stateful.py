"""Random long runs over the model: the explorer's step and invariants, past its bounds.

The explorer enumerates every world for small ``max_attempts``; this hypothesis machine samples
much longer sequences with a larger limit, checking the same invariants after every step.
"""

from __future__ import annotations

from hypothesis import event, note
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from steadysocket.model.explore import (
    SERVER_CHANGES,
    USER_INPUTS,
    Config,
    Explorer,
    Input,
    Socket,
    initial_world,
    inputs,
)
from steadysocket.model.snapshot import Phase


class LifecycleModel(RuleBasedStateMachine):
    """Applies random inputs to the real ``Lifecycle`` through the explorer's step function."""

    def __init__(self) -> None:
        super().__init__()
        self.explorer = Explorer(Config(max_attempts=8, probe=True))
        self.world = initial_world()

    @rule(data=st.data())
    def something_happens(self, data: st.DataObject) -> None:
        # The application and changes of server behaviour come rarely compared with the
        # server's reactions and the timers; otherwise most runs reset before going anywhere.
        available = sorted(inputs(self.world), key=str)
        buckets = [
            [i for i in available if i in USER_INPUTS],
            [i for i in available if i in SERVER_CHANGES],
            [i for i in available if i not in USER_INPUTS and i not in SERVER_CHANGES],
        ]
        roll = data.draw(st.integers(0, 19), label="roll")
        bucket = buckets[0] if roll < 2 else buckets[1] if roll < 5 else buckets[2]
        inp = data.draw(st.sampled_from(bucket or available), label="input")
        step = self.explorer.step(self.world, inp)
        note(f"{self.world} --{inp}--> {step.world}")
        assert step.problems == (), step.problems
        if step.event is not None:
            event(f"transition {step.source} --{step.event}--> {step.world.phase}")
        self.world = step.world
        event(f"phase {self.world.phase}")

    @rule()
    def disconnect_always_reaches_idle(self) -> None:
        step = self.explorer.step(self.world, Input.DISCONNECT)
        assert step.world.phase is Phase.IDLE
        assert step.world.socket is Socket.NONE
        assert step.world.timers == frozenset()

    @invariant()
    def world_invariants_hold(self) -> None:
        assert self.explorer.world_problems(self.world) == []

    @invariant()
    def attempts_never_exceed_the_maximum(self) -> None:
        assert 0 <= self.world.attempts <= self.explorer.config.max_attempts


TestLifecycleModel = LifecycleModel.TestCase
