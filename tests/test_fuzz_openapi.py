"""Property-based fuzzing of every operation in the app's OpenAPI schema (schemathesis) against a real
server: whatever is sent, the answer is never a 5xx. Bounded: 25 examples per operation (~20 s)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (pip install -e .[dev])")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from tests.conftest import LiveServer, make_image_bytes  # noqa: E402


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, redis_server, tiny_bundle):
    import httpx

    from service.settings import Settings

    srv = LiveServer(Settings(data_dir=tmp_path_factory.mktemp("fuzz-data"), redis_url=redis_server.url,
                              model_dir=tiny_bundle, ort_threads=1, retention_sweep_interval_s=3600))
    # something to find: a gallery named like the fuzzer's strings often are not, but real paths exist
    httpx.post(f"{srv.url}/v1/galleries/g1/images", files=[("files", ("a.png", make_image_bytes(1)))],
               data={"camera_id": "c1", "person_id": "p1"}, timeout=60)
    yield srv
    srv.stop()


def test_no_server_errors(fuzz_server):
    """Each operation gets a few generated requests (valid and not); a 5xx anywhere fails with the case."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures, ops = [], 0
    for result in schema.get_all_operations():
        op = result.ok()
        ops += 1

        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            case.call_and_validate(base_url=fuzz_server.url, checks=[not_a_server_error], timeout=30)

        try:
            run()
        except Exception as e:  # collect every operation's failure, not just the first
            failures.append(f"{op.method.upper()} {op.path}: {str(e)[:500]}")
    assert ops >= 20
    assert not failures, "\n".join(failures)
    import httpx

    sent = sum(float(line.split()[-1]) for line in httpx.get(f"{fuzz_server.url}/metrics").text.splitlines()
               if line.startswith("reid_http_requests_total{"))
    assert sent > 10 * ops  # the fuzzer really called the server
