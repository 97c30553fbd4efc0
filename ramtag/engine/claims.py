"""Which process reads which work unit: claimed one at a time from a shared counter, so that ranks finish together.

Every claimer (each DataLoader worker of each rank, or the rank itself with ``--workers 0``) takes the next
unclaimed unit by an atomic ``add`` on one counter in torch.distributed's key-value store (the c10d TCPStore
that torchrun's agent, or rank 0, serves at ``MASTER_ADDR:MASTER_PORT``; every rank reached it to join the
process group). A fast rank takes more units and a skewed shard holds only the claimer that reads it, instead
of the static ``tasks[rank::world][worker::workers]`` split, where the rank with the big shard ran alone at
the end while the others waited at the barrier. There is no scheduler of ramtag's own: the counter is the
whole protocol, and the ledger (not the counter) records what is done, so a restarted group starts a fresh
counter over the units the ledger still lacks.

Why each DataLoader worker opens its own store client, rather than the rank claiming and feeding its workers
through queues: a worker is a separate process and cannot use the rank's process group, and a feeding rank
would have to claim ahead of its workers, holding units that an idle rank could have taken; it would also add
a second channel that must be drained and shut down with the DataLoader. A client per worker is one TCP
connection and one round trip per unit (units are thousands of images), needs no thread in the rank, and dies
with its worker. One process outside torchrun has no store, so with several workers it serves one on loopback
(port chosen by the system); with one worker or none it reads the units in order, as before.

``RAMTAG_STATIC_UNITS=1`` restores the static split; it exists for benchmarks/scale_skew.py, which measures
what the dynamic claim gains, and for tests that need every rank to take units. It is not a user option.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from ramtag.data.units import UnitTask
from ramtag.engine import dist

STATIC_ENV = "RAMTAG_STATIC_UNITS"
STORE_TIMEOUT = timedelta(minutes=5)
"""How long a claim waits for the store: it is up while the job is (torchrun's agent or rank 0 serves it)."""


@dataclass
class StoreClaim:
    """The next unit to read, as an index into the run's task list, or None when none is left.

    Picklable (host, port and key only), so DataLoader workers receive it inside the dataset; each process
    opens its own client on its first claim."""

    host: str
    port: int
    key: str
    count: int
    _store: Any = field(default=None, repr=False, compare=False)

    def __call__(self) -> int | None:
        if self._store is None:
            from torch.distributed import TCPStore

            self._store = TCPStore(self.host, self.port, is_master=False, timeout=STORE_TIMEOUT)
        index = int(self._store.add(self.key, 1)) - 1
        return index if index < self.count else None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}  # a connection does not cross processes


@dataclass
class Claims:
    """What this rank reads: ``tasks`` (all of them when ``claim`` hands them out, else this rank's share)."""

    tasks: list[UnitTask]
    claim: StoreClaim | None = None
    server: Any = field(default=None, repr=False)
    """The loopback store of a run without torchrun, kept alive while the run reads."""


def static_share(tasks: list[UnitTask], rank: int, world_size: int) -> list[UnitTask]:
    """Rank ``r`` of ``n`` takes every ``n``-th unit still to do (DataLoader workers then split it the same way)."""
    return list(tasks[rank::world_size])


def claim_units(tasks: list[UnitTask], workers: int) -> Claims:
    """Every rank calls this together, with the same ``tasks``; see the module docstring."""
    info = dist.info()
    if os.environ.get(STATIC_ENV) == "1":
        return Claims(static_share(tasks, info.rank, info.world_size))
    # one key per run: rank 0 names it, so that a restarted group (or a second run under the same agent
    # store) counts from zero over its own task list
    key = dist.broadcast_object(f"ramtag/claims/{uuid.uuid4().hex}")
    if info.distributed:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        return Claims(tasks, StoreClaim(host, port, key, len(tasks)))
    if workers <= 1 or len(tasks) <= 1:
        return Claims(tasks)
    from torch.distributed import TCPStore

    server = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=STORE_TIMEOUT)
    return Claims(tasks, StoreClaim("127.0.0.1", server.port, key, len(tasks)), server)
