"""``steadysocket demo`` runs the real code path and its transcript shows every phase."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from steadysocket.model.snapshot import Phase
from steadysocket.runtime.demo import run_demo

Summary = Callable[[str, str], None]


def test_the_demo_walks_through_every_phase_and_ends_idle(summary: Summary) -> None:
    transcript: list[str] = []
    result = asyncio.run(run_demo(transcript.append))
    text = "\n".join(transcript)
    assert set(result.phases) == set(Phase)
    assert result.phases[0] is Phase.IDLE
    assert result.phases[-1] is Phase.IDLE
    for phase in Phase:
        assert f"-> {phase}" in text or f"phase {phase} ->" in text
    for chapter in (
        "1. connect and hello",
        "2. messages both ways",
        "3. the network goes quiet",
        "4. the server restarts",
        "5. the server stays down",
        "6. the server returns",
        "summary",
    ):
        assert chapter in text
    assert "retry in" in text
    # The attempt numbers restart with each outage, and the demo says so.
    assert "attempts are numbered per outage: #1 is the first attempt of each outage" in text
    assert "(attempt 1 of this outage failed; retry in" in text
    assert "recent attempts (newest first; numbered per outage):" in text
    assert "reason:" in text
    assert result.final_state is not None
    assert result.final_state.stats.successful_connections >= 4
    summary("demo", f"phases: {' -> '.join(str(p) for p in result.phases)}")
