"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis).

For every operation, valid and invalid requests generated from the schema are sent to
the real API process: none may get a 5xx, and every /v1 operation must answer 401 when
the same request comes without a key, or with a wrong one. Bounded (a fixed number of
examples per operation, derandomised) so it runs in well under a minute.

Random ids only ever reach a 404, so the cases also draw the ids of a real file and a real
(queued) job for path parameters, and event-id-shaped values for `after` and
`Last-Event-ID` around the edges of what Redis accepts (each half of a stream id is an
unsigned 64-bit integer): an id parsed from user input must be a 400 at worst, never a
Redis error turned into a 500.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the `test` extra)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the importorskip)
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.reliability.helpers import create_job, docs, upload  # noqa: E402

EXAMPLES = 20  # per operation and generation mode

U64 = 2**64 - 1
EDGES = [0, 1, U64, U64 + 1, 10**20 - 1]
"""Halves of a stream id at the edges of what Redis accepts (and the largest twenty digits allow)."""
EVENT_IDS = st.builds(
    lambda prefix, ms, seq: f"{prefix}{ms}-{seq}",
    st.sampled_from(["ftevent-", ""]),
    st.sampled_from(EDGES) | st.integers(0, 10**20 - 1),
    st.sampled_from(EDGES) | st.integers(0, 10**20 - 1),
)
"""`after` / `Last-Event-ID` values shaped like event ids."""


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("fuzz"), SECO_MAX_UPLOAD_BYTES=str(1 << 20))
    yield s
    s.close()


@pytest.fixture(scope="module")
def real_ids(svc: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A file and a job that exist, for path parameters. The job is cancelled (there is no
    worker), so its event stream replays and ends instead of waiting for news."""
    file_id = upload(svc, tmp_path_factory.mktemp("fuzz-data"), docs(2))
    job_id = create_job(svc, file_id)
    svc.client().fine_tuning.jobs.cancel(job_id)
    return {"file_id": file_id, "fine_tuning_job_id": job_id}


GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def by_design(op_path: str, r: Any) -> bool:
    """A 5xx this service answers on purpose: /readyz without a worker, and a completion of a
    model that exists while no inference server is configured (none runs here)."""
    if r.status_code != 503:
        return False
    if op_path == "/readyz":
        return True
    return op_path in GENERATION_PATHS and r.json().get("error", {}).get("code") == "inference_unavailable"


class Fuzzer:
    """Sends each generated case with the key, without it and with a wrong one; collects problems."""

    def __init__(self, svc: Any, real_ids: dict[str, str]) -> None:
        self.svc = svc
        self.real_ids = real_ids
        self.problems: list[str] = []
        self.calls = 0
        self.unsatisfiable: list[str] = []

    def _call(self, case: Any, headers: dict[str, str]) -> Any:
        self.calls += 1
        return case.call(base_url=self.svc.url, headers=headers, timeout=15)

    def check(self, case: Any, label: str, op_path: str) -> None:
        import requests

        # schemathesis may fill the bearer scheme itself; each call below sets it explicitly
        case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() != "authorization"}
        try:
            r = self._call(case, {"Authorization": f"Bearer {self.svc.key()}"})
            if r.status_code >= 500 and not by_design(op_path, r):
                self.problems.append(f"{label} -> {r.status_code}: {r.text[:300]}")
            if op_path.startswith("/v1/"):
                for headers in ({}, {"Authorization": "Bearer sk-not-a-key"}):
                    r = self._call(case, headers)
                    if r.status_code != 401:
                        self.problems.append(f"{label} with {headers or 'no key'} -> {r.status_code}: {r.text[:200]}")
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
            return  # a request no HTTP client can send (e.g. a newline in a header)

    def with_ids(self, case: Any, real: bool, event_id: str | None) -> Any:
        """The case with real ids in its path (when `real`) and an event-id-shaped `after`."""
        params = {p.name: p.location for p in case.operation.iter_parameters()}
        if real and case.operation.method.upper() != "DELETE":  # the real ids must outlive the run
            ids = {k: v for k, v in self.real_ids.items() if params.get(k) == "path"}
            case.path_parameters = {**(case.path_parameters or {}), **ids}
        if event_id is not None:
            if params.get("after") == "query":
                case.query = {**(case.query or {}), "after": event_id}
            if params.get("last-event-id") == "header":
                case.headers = {**(case.headers or {}), "last-event-id": event_id}
        return case

    def edges(self, op: Any) -> None:
        """Every edge event id, on the real job: random draws alone may never pair the two."""
        if not {"after", "last-event-id"} & {p.name for p in op.iter_parameters()}:
            return
        for ms in EDGES:
            for seq in EDGES:
                case = self.with_ids(op.Case(), True, f"ftevent-{ms}-{seq}")
                self.check(case, f"{op.label} [edges]", op.path)

    def run(self, op: Any, mode: Any) -> None:
        label = f"{op.label} [{mode.value}]"

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=op.as_strategy(generation_mode=mode), real=st.booleans(), event_id=st.none() | EVENT_IDS)
        def fuzz(case: Any, real: bool, event_id: str | None) -> None:
            self.check(self.with_ids(case, real, event_id), label, op.path)

        try:
            fuzz()
        except Unsatisfiable:
            self.unsatisfiable.append(label)  # e.g. no invalid request exists for GET /healthz


def test_no_5xx_and_no_endpoint_without_a_key(svc: Any, real_ids: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{svc.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    fuzzer = Fuzzer(svc, real_ids)
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzzer.run(op, mode)
        fuzzer.edges(op)
    assert fuzzer.calls > len(operations) * EXAMPLES, fuzzer.calls
    assert not [u for u in fuzzer.unsatisfiable if "POSITIVE" in u.upper()], fuzzer.unsatisfiable
    assert not fuzzer.problems, "\n".join(sorted(set(fuzzer.problems))[:30])
    with svc.http(None) as http:
        assert http.get("/healthz").status_code == 200, "the API survived the fuzzing"
