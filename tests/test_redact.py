"""Secrets masked in what we say (wsi_sampler.redact): canaries in every shape an upstream
might echo them."""

from __future__ import annotations

import pytest

from wsi_sampler.redact import (
    public_url,
    redact,
    remember_secret,
    upstream_reason,
    url_credentials,
)

CANARY = "canary-7d1e4f9a"


@pytest.mark.parametrize("text", [
    f"you sent Authorization=Bearer {CANARY}",
    f"header authorization: Bearer {CANARY}",
    f"GET https://user:{CANARY}@host/v1 failed",
    f"GET https://host/v1?api-key={CANARY}&x=1 failed",
    f'{{"api_key": "{CANARY}"}}',
    f"password={CANARY}",
    f"X-Amz-Signature={CANARY}",
    f"token {CANARY}",
])
def test_secret_shaped_values_are_masked(text: str) -> None:
    assert CANARY not in redact(text)
    assert "[redacted]" in redact(text)


def test_known_secrets_and_key_shapes_are_masked() -> None:
    remember_secret("plainword-secret-93")
    assert redact("the key plainword-secret-93 was refused") == "the key [redacted] was refused"
    assert redact("sk-abcdefghijklmnop and AKIAABCDEFGHIJKLMNOP") == "[redacted] and [redacted]"
    for words in ("no secrets in this sentence about tokens", "the token budget is spent"):
        assert redact(words) == words


def test_urls() -> None:
    assert url_credentials("http://u:p@h:1/v1") == "user info (user:password@)"
    assert url_credentials("http://h/v1?api-key=x") == "a query string"
    assert url_credentials("http://h:8000/v1") is None
    assert public_url("https://u:p@host:8443/v1?key=x#f") == "https://host:8443/v1"


def test_upstream_reason_is_one_short_redacted_line() -> None:
    body = f"\n  Internal error: you sent Authorization=Bearer {CANARY}\ntraceback line\n"
    reason = upstream_reason(body, limit=40)
    assert CANARY not in reason and "\n" not in reason and len(reason) <= 40
    assert reason.startswith("Internal error")
