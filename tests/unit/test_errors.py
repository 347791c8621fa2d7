import json

from serve.gateway.errors import error_body, model_not_found, normalize


def test_error_body_shape():
    assert error_body(429, "slow down", code="rate_limit_exceeded") == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None,
                  "code": "rate_limit_exceeded"}}


def test_model_not_found_is_openai_404():
    e = model_not_found("nope")
    assert e.status == 404 and e.body()["error"]["code"] == "model_not_found"
    assert e.body()["error"]["param"] == "model"


def test_normalize_vllm_context_length_error():
    raw = json.dumps({"error": {"message": "This model's maximum context length is 512 tokens. However, "
                      "your prompt contains at least 513 input tokens", "type": "BadRequestError",
                      "param": "input_tokens", "code": 400}}).encode()
    err = json.loads(normalize(400, raw))["error"]
    assert err["type"] == "invalid_request_error"
    assert err["code"] == "context_length_exceeded"
    assert err["param"] == "messages"
    assert "maximum context length" in err["message"]


def test_normalize_keeps_param_and_drops_numeric_code():
    raw = json.dumps({"error": {"message": "temperature must be >= 0", "type": "BadRequestError",
                                "param": "temperature", "code": 400}}).encode()
    err = json.loads(normalize(400, raw))["error"]
    assert err == {"message": "temperature must be >= 0", "type": "invalid_request_error",
                   "param": "temperature", "code": None}


def test_normalize_non_json_and_fastapi_detail():
    assert json.loads(normalize(502, b"<html>bad gateway</html>"))["error"]["type"] == "server_error"
    err = json.loads(normalize(422, json.dumps({"detail": "field required"}).encode()))["error"]
    assert err["message"] == "field required" and err["type"] == "invalid_request_error"
    assert json.loads(normalize(500, b""))["error"]["message"] == "engine answered 500"
