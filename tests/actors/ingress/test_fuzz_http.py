"""Fuzzing the HTTP API with schemathesis against the app's own OpenAPI schema (/openapi.json, request bodies
included): valid and invalid requests to every operation, in process, with a fake worker and an API key. No answer may
be a 5xx, every error must be OpenAI's error JSON, and nothing may hang (pytest-timeout). Bounded and repeatable:
a fixed number of examples per operation, derandomized, no example database."""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from moemesh.actors.ingress.app import Ingress
from moemesh.actors.ingress.metrics import Metrics
from moemesh.actors.ingress.protocol import IngressLimits
from moemesh.actors.request import Delta, TokenLogprobs

pytestmark = pytest.mark.timeout(120)
KEY = "sk-fuzz-0123456789abcdefghij"
EXAMPLES = 60  # per operation and generation mode


def _logprobs(ids, k) -> TokenLogprobs | None:
    """Made-up logprobs in the worker's shape (-inf included: what a logits processor's mask gives)."""
    if k is None:
        return None
    return TokenLogprobs([-0.5] * len(ids), [[3 + j for j in range(k)] for _ in ids],
                         [[float("-inf")] * k for _ in ids])


class QuickWorker:
    """Answers every sequence with up to 8 tokens at once, with logprobs when asked (the fuzzer probes the ingress,
    not generation)."""

    async def generate(self, request_id, prompt_token_ids, params):
        n = min(params.max_tokens, 8)
        for i in range(n):
            yield Delta([7 + i], ("length" if n == params.max_tokens else "stop") if i + 1 == n else None,
                        logprobs=_logprobs([7 + i], params.logprobs),
                        prompt_logprobs=_logprobs(prompt_token_ids[1:], params.prompt_logprobs) if i == 0 else None)

    async def load(self) -> float:
        return 0.0

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir):
    limits = IngressLimits(max_tokens=64, max_n=2, max_prompts=2, max_body_bytes=64 * 1024)
    ingress = Ingress.from_checkpoint(tiny_model_dir, [QuickWorker()], model_name="tiny", limits=limits,
                                      metrics=Metrics(process_collectors=False), api_keys=[KEY])
    schema = schemathesis.openapi.from_asgi("/openapi.json", ingress.http_app)
    schema.config.generation.update(modes=[schemathesis.GenerationMode.POSITIVE,
                                           schemathesis.GenerationMode.NEGATIVE],
                                    max_examples=EXAMPLES, deterministic=True, database="none")
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


def openai_errors(ctx, response, case) -> None:
    """Every 4xx is OpenAI's error JSON."""
    if response.status_code >= 400:
        body = json.loads(response.content)
        assert set(body["error"]) == {"message", "type", "param", "code"}, body


def _integral_floats_as_ints(value):
    """JSON Schema counts 1.0 as an integer; our API does not (docs/api.md), and the generator produces it so often
    that most requests would stop there."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    return value


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error(case):
    if isinstance(case.body, dict):
        case.body = _integral_floats_as_ints(case.body)
        if isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"  # else nearly every generated request would stop at 404 (unknown model)
    response = case.call(headers={"Authorization": f"Bearer {KEY}"})
    case.validate_response(response, checks=[schemathesis.checks.not_a_server_error, openai_errors])
