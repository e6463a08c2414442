"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis).

For every operation, valid and invalid requests generated from the schema are sent to
the real API process: none may get a 5xx, and every /v1 operation must answer 401 when
the same request comes without a key, or with a wrong one. Bounded (a fixed number of
examples per operation, derandomised) so it runs in well under a minute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (the `test` extra)")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402  (after the importorskip)
from hypothesis.errors import Unsatisfiable  # noqa: E402

EXAMPLES = 20  # per operation and generation mode


@pytest.fixture(scope="module")
def svc(launch_service: Callable[..., Any], redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    s = launch_service(redis_url, tmp_path_factory.mktemp("fuzz"), SECO_MAX_UPLOAD_BYTES=str(1 << 20))
    yield s
    s.close()


class Fuzzer:
    """Sends each generated case with the key, without it and with a wrong one; collects problems."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
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
            if r.status_code >= 500 and not (op_path == "/readyz" and r.status_code == 503):  # no worker: by design
                self.problems.append(f"{label} -> {r.status_code}: {r.text[:300]}")
            if op_path.startswith("/v1/"):
                for headers in ({}, {"Authorization": "Bearer sk-not-a-key"}):
                    r = self._call(case, headers)
                    if r.status_code != 401:
                        self.problems.append(f"{label} with {headers or 'no key'} -> {r.status_code}: {r.text[:200]}")
        except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
            return  # a request no HTTP client can send (e.g. a newline in a header)

    def run(self, op: Any, mode: Any) -> None:
        label = f"{op.label} [{mode.value}]"

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(case=op.as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            self.check(case, label, op.path)

        try:
            fuzz()
        except Unsatisfiable:
            self.unsatisfiable.append(label)  # e.g. no invalid request exists for GET /healthz


def test_no_5xx_and_no_endpoint_without_a_key(svc: Any) -> None:
    schema = schemathesis.openapi.from_url(f"{svc.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    fuzzer = Fuzzer(svc)
    for op in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            fuzzer.run(op, mode)
    assert fuzzer.calls > len(operations) * EXAMPLES, fuzzer.calls
    assert not [u for u in fuzzer.unsatisfiable if "POSITIVE" in u.upper()], fuzzer.unsatisfiable
    assert not fuzzer.problems, "\n".join(sorted(set(fuzzer.problems))[:30])
    with svc.http(None) as http:
        assert http.get("/healthz").status_code == 200, "the API survived the fuzzing"
