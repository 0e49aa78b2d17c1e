"""Scenario 6 of issue 11: the agent's API fuzzed against its own OpenAPI schema.

Schemathesis generates requests for every operation of `/v1/openapi.json` (valid ones and,
in its negative mode, requests that break the schema) and checks each answer: never a
5xx, the status and body as documented. Bounded for CI: a few dozen examples per
operation and mode. The same agent then gets the generated requests without the token
(every route but /health: 401), path tricks in URLs, and bundles whose manifest lies
about its own fields (what a hand-made hostile bundle could carry past the tar checks).
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode, checks
from testkit.agent import artifact_members, handmade_artifact, http, regular, sha256, tar_bytes

from devices.agent import start_local_agent

MAX_UPLOAD = 64 << 10
EXAMPLES_PER_OPERATION = 25
FUZZ_BUDGET_S = 75.0


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LFM2_NAS_LOCKS", str(tmp_path_factory.mktemp("locks")))
        handle = start_local_agent(name="fuzzed", workdir=tmp_path_factory.mktemp("agent"), max_upload=MAX_UPLOAD, threads=1, job_timeout_s=60)
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def schema(agent):
    return schemathesis.openapi.from_url(f"{agent.url}/v1/openapi.json", headers={"Authorization": f"Bearer {agent.token}"})


def _operations(schema) -> list:
    return [result.ok() for result in schema.get_all_operations()]


def _fuzz(operation, mode: GenerationMode, budget_end: float, call, examples: int = EXAMPLES_PER_OPERATION) -> int:
    """Run up to `examples` generated cases of `operation` through `call`;
    returns how many ran (fewer once the time budget is spent)."""
    ran = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same inputs on every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case) -> None:
        nonlocal ran
        if time.monotonic() > budget_end:
            return
        ran += 1
        call(case)

    try:
        run()
    except Unsatisfiable:
        assert mode == GenerationMode.NEGATIVE, operation.label  # no input of it can break the schema (e.g. no parameters)
    return ran


def test_fuzzed_api_never_fails_and_answers_as_documented(agent, schema, figures):
    """Every operation, valid and schema-breaking inputs: no 5xx, statuses and bodies as
    the schema says, the agent alive and its worker running at the end."""
    auth = {"Authorization": f"Bearer {agent.token}"}
    budget_end = time.monotonic() + FUZZ_BUDGET_S
    tried, operations = 0, _operations(schema)
    assert len(operations) >= 7, [op.label for op in operations]
    for operation in operations:
        # Some rules are beyond JSON Schema: a bundle's bytes must hash to the name in its
        # URL, a protocol's min_runs may not exceed its max_runs. A schema-valid request
        # that breaks one is rightly refused (422), so "valid data is accepted" is off for
        # the two writing routes (their refusals are checked in test_agent_service.py).
        excluded = [checks.positive_data_acceptance] if operation.method.upper() in ("PUT", "POST") else []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            # call_and_validate raises on the first failed check, naming the case (and a curl line to replay it)
            tried += _fuzz(operation, mode, budget_end, lambda case, excluded=excluded: case.call_and_validate(headers=auth, timeout=30, excluded_checks=excluded))
    assert tried >= len(operations) * 4, "the time budget ran out before every operation was fuzzed"
    with http(agent.url, agent.token) as client:
        info = client.get("/v1/info").json()
    assert agent.running() and info["worker_alive"]
    figures("agent API fuzz (schemathesis)", operations=len(operations), inputs_tried=tried, server_errors=0, crashes=0)


def test_fuzzed_requests_without_the_token_learn_nothing(agent, schema, figures):
    """The generated requests again, with no token and with a wrong one: every route but
    /v1/health answers 401 before it looks at the request."""
    budget_end = time.monotonic() + 30
    refused = 0

    def without_token(case) -> None:
        nonlocal refused
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-the-token"}):
            response = case.call(headers=headers, timeout=30)
            if case.operation.path == "/v1/health":
                assert response.status_code == 200
                continue
            assert response.status_code == 401, (case.method, case.formatted_path, response.status_code, response.text[:200])
            assert agent.token not in response.text and "Bearer" in response.headers["www-authenticate"]
            if case.method.upper() != "HEAD":  # a HEAD answer has no body
                assert "token" in response.json()["detail"]
            refused += 1

    tried = sum(_fuzz(operation, GenerationMode.POSITIVE, budget_end, without_token, examples=12) for operation in _operations(schema))
    assert refused >= 20
    figures("agent API without a token", inputs_tried=tried, refused_401=refused, leaks=0)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/artifacts/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/artifacts/../../etc/passwd",
        "/v1/artifacts/%2e%2e",
        "/v1/jobs/..%2F..%2Fjobs.sqlite",
        "/v1/jobs/%00",
        "/v1/../../../../etc/passwd",
        "/v1/health/../info",
        "/v1/health%2F..%2Finfo",
        "//v1/info",
    ],
)
def test_path_tricks_in_urls_are_refused(agent, path):
    """Encoded and plain `..`, NULs, a doubled slash: without the token never anything but
    401/404; with it, never a file from outside the API."""
    url = httpx.URL(agent.url).copy_with(raw_path=path.encode())
    with httpx.Client(timeout=10) as anonymous:
        response = anonymous.get(url)
    assert response.status_code in (401, 404), (path, response.status_code)
    assert "root:" not in response.text and "SQLite" not in response.text
    with httpx.Client(timeout=10, headers={"Authorization": f"Bearer {agent.token}"}) as client:
        response = client.get(url)
    assert response.status_code < 500 and "root:" not in response.text and "SQLite" not in response.text, (path, response.status_code)


def _lying_manifests(artifact) -> dict[str, bytes]:
    """Bundles that pass every tar check (regular files, safe names, hashes that match)
    but whose manifest.json lies about what the artifact is."""
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    honest = [m for m in artifact_members(artifact) if m[0].name != "manifest.json"]

    def with_manifest(text: bytes) -> bytes:
        return tar_bytes(honest + [regular("manifest.json", text)])

    def changed(**fields) -> bytes:
        return with_manifest(json.dumps({**manifest, **fields}).encode())

    return {
        "max_context is text": changed(max_context="x"),
        "max_context is 0": changed(max_context=0),
        "prompt_lengths hold text": changed(prompt_lengths=["a"]),
        "key is a number": changed(key=5),
        "backend is a list": changed(backend=["eager"]),
        "unknown backend": changed(backend="tflite"),
        "spec is junk": changed(spec={"x": 1}),
        "files is a list": changed(files=["model.bin"]),
        "manifest is a list": with_manifest(b"[1, 2]"),
        "deeply nested JSON": with_manifest(b"[" * 20_000),
        "not UTF-8": with_manifest(b"\xff\xfe{}"),
    }


def test_bundles_whose_manifest_lies_are_refused_and_leave_nothing(agent, tmp_path, figures):
    """Such a bundle, once stored, would break every later HEAD/GET of it (the answer no
    longer fits the schema) and reach measure() with nonsense: refused with 422 at upload."""
    artifact = handmade_artifact(tmp_path / "a")
    cases = _lying_manifests(artifact)
    with http(agent.url, agent.token) as client:
        for case, data in cases.items():
            response = client.put(f"/v1/artifacts/{sha256(data)}", content=data)
            assert response.status_code == 422, (case, response.status_code, response.text[:300])
            assert "manifest" in response.json()["detail"], (case, response.text[:300])
            assert str(agent.workdir) not in response.text  # no server paths in answers
            assert client.head(f"/v1/artifacts/{sha256(data)}").status_code == 404, case
        assert client.get("/v1/health").status_code == 200
    assert list((agent.workdir / "tmp").iterdir()) == []
    figures("hostile manifests", inputs_tried=len(cases), refused=len(cases), stored=0)
