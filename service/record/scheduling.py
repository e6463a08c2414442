"""Fair scheduling across tenants: which queued job a free worker starts next.

One FIFO queue let a tenant with twenty long jobs hold every GPU for hours while another
tenant's single job waited. The rule now: the next job to start is the oldest queued job
of the tenant with the fewest running jobs; among tenants with as many running jobs, the
one served least recently (never served first, then the oldest job first): round-robin.

It is applied when a worker becomes free, not when a job is queued: the broker carries
anonymous "a job is waiting" messages (one per queued job, see `service.record.queue`), and
the worker that takes one claims the job this order puts first (`Store.claim_next`). So
a resumed job, a reaper's requeue or a new tenant's job is scheduled fairly at the next
free worker, whatever order the messages were sent in, and nothing about the order lives
in the broker: it is recomputed from Redis (queued jobs, running jobs, when each tenant
was last served), which survives restarts.

`fair_order` also defines the queue position users see: position n means that n - 1
queued jobs start before this one if no job is added, cancelled or finishes meanwhile
(each start counts as one more running job of its tenant). With one worker, where every
tenant has no running job whenever a worker is free, this is exactly the start order.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Queued:
    """A queued job: its tenant, and its age (the tenant's job sequence number; lower is older)."""

    job_id: str
    tenant: str
    seq: int


def fair_order(queued: Iterable[Queued], running: Counter[str], served: dict[str, int]) -> list[str]:
    """Queued job ids in the order they start.

    `running`: running jobs per tenant; `served`: per tenant, an increasing stamp of its
    last start (absent: never served).
    """
    per_tenant: dict[str, list[Queued]] = defaultdict(list)
    for q in queued:
        per_tenant[q.tenant].append(q)
    for jobs in per_tenant.values():
        jobs.sort(key=lambda q: (q.seq, q.job_id), reverse=True)  # oldest last: pop() takes it
    running = Counter(running)
    served = dict(served)
    stamp = max(served.values(), default=0)

    def key(tenant: str) -> tuple[int, int, int, str]:
        return (running[tenant], served.get(tenant, 0), per_tenant[tenant][-1].seq, tenant)

    heap = [key(t) for t in per_tenant]
    heapq.heapify(heap)
    order: list[str] = []
    while heap:
        tenant = heapq.heappop(heap)[3]
        order.append(per_tenant[tenant].pop().job_id)
        running[tenant] += 1
        stamp += 1
        served[tenant] = stamp
        if per_tenant[tenant]:
            heapq.heappush(heap, key(tenant))
    return order
