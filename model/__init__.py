"""steadysocket.model: the Sans-I/O core. Nothing here performs I/O or reads a clock.

The names most programs need are here too: ``BackoffStrategy`` (``model.backoff``), and
``Phase`` and ``WSState`` (``model.snapshot``). Everything else is in its module.
"""

from steadysocket.model.backoff import BackoffStrategy
from steadysocket.model.snapshot import Phase, WSState

__all__ = ["BackoffStrategy", "Phase", "WSState"]
