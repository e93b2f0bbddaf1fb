"""schemathesis over the server's own /openapi.json (real server on 127.0.0.1): no input the schema allows,
and no malformed one, may produce a 5xx, and every 4xx comes in the error shape of its API. Bounded: few examples per operation, a tiny model, short contexts."""
from __future__ import annotations

import pytest

from conftest import tiny_model, tokenizer_dir
from test_serve import serve

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings


@pytest.fixture(scope="module")
def live():
    from transformers import AutoTokenizer

    from minimind.engine import LLM
    from minimind.serve import create_app

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir("minimind2")))
    llm = LLM(tiny_model(vocab_size=6400), tokenizer=tok, max_num_seqs=4, max_model_len=48)
    app = create_app(llm, served_model_name="tiny")
    with serve(app) as url:
        yield url, app


def error_in_its_api_shape(path: str, body) -> bool:
    """Anthropic's shape under /v1/messages, Ollama's under /api/, OpenAI's envelope elsewhere."""
    if path.startswith("/v1/messages"):
        return (body.get("type") == "error" and isinstance(body.get("error"), dict)
                and {"type", "message"} <= set(body["error"]))
    if path.startswith("/api/"):
        return list(body) == ["error"] and isinstance(body["error"], str)
    return isinstance(body.get("error"), dict) and {"message", "type", "param", "code"} <= set(body["error"])


def test_no_server_errors(live):
    from hypothesis import given

    url, _ = live
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8
    failures, statuses = [], set()
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(base_url=url, timeout=60)
            statuses.add(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} {case.body!r}: {response.status_code} {response.text[:300]}")
            elif response.status_code >= 400 and not error_in_its_api_shape(case.path, response.json()):
                failures.append(f"{case.method} {case.path}: {response.status_code} not in its API's error shape: "
                                f"{response.text[:300]}")

        check()
    assert not failures, "\n".join(failures[:5])
    assert 200 in statuses and 400 in statuses  # both accepted and rejected inputs were exercised
