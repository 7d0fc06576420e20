"""Checks shared by the HTTP tests."""


def assert_error(r, status: int, code: str | None = None) -> dict:
    """The answer has this status and the API's error body `{"error": {"code", "message"}}`; returns it."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == {"code", "message"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body
