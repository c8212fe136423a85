"""Keep secrets out of what we say: error answers, job records, files and INFO logs.

Upstream servers (a VLM, an OIP worker, S3, a PACS) may echo what we sent them, credentials
included, in their error bodies; URLs may carry ``user:password@`` or ``?api-key=…``. Three
tools, used wherever upstream text or a URL could reach a message:

- :func:`url_credentials` says whether a URL carries credentials (such URLs are refused);
- :func:`public_url` is a URL without user info, query or fragment;
- :func:`redact` masks the secrets this process knows (:func:`remember_secret`: API keys,
  passwords from the configuration) and anything shaped like one (bearer tokens,
  ``key=value`` pairs with a secret-sounding key, URL user info, ``sk-…`` and AWS key ids);
- :func:`upstream_reason` is the short, redacted first line of an upstream body that an
  answer may quote (the whole body belongs in a DEBUG log only).
"""

from __future__ import annotations

import re
import threading
from urllib.parse import urlsplit, urlunsplit

__all__ = ["REDACTED", "public_url", "redact", "remember_secret", "upstream_reason",
           "url_credentials"]

REDACTED = "[redacted]"
_MIN_SECRET_LEN = 4  # shorter values would mask ordinary words
_known: set[str] = set()
_lock = threading.Lock()

_SECRET_KEYS = (r"api[-_]?key|apikey|access[-_]?key(?:[-_]?id)?|secret(?:[-_]?access[-_]?key)?"
                r"|token|access[-_]?token|session[-_]?token|security[-_]?token|password|passwd"
                r"|pwd|auth|authorization|signature|sig|x-amz-signature|x-amz-credential"
                r"|x-amz-security-token|credential|client[-_]?secret")
_PATTERNS = (
    # a credential after its scheme word; a digit in it tells it from ordinary words
    (re.compile(r"(?i)\b(bearer|basic|token)\s+(?=[A-Za-z._~+/=-]*[0-9])[A-Za-z0-9._~+/=-]{6,}"),
     rf"\1 {REDACTED}"),
    (re.compile(rf"(?i)\b({_SECRET_KEYS})(\"?\s*[=:]\s*\"?)(?:bearer\s+|basic\s+)?"
                r"[^\s&,;\"'}]+"), rf"\1\2{REDACTED}"),
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@:]*:[^/\s@]*@"), rf"\1{REDACTED}@"),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), REDACTED),
    (re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"), REDACTED),
)


def remember_secret(value: str | None) -> None:
    """Mask ``value`` wherever :func:`redact` sees it from now on (configured keys etc.)."""
    if value and len(value) >= _MIN_SECRET_LEN:
        with _lock:
            _known.add(value)


def redact(text: str) -> str:
    """``text`` with every known secret and every secret-shaped value masked."""
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, REDACTED)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def url_credentials(url: str) -> str | None:
    """What credentials ``url`` carries (``user info`` / ``a query string``), or None."""
    parts = urlsplit(url)
    found = [what for what, present in (("user info (user:password@)", parts.username
                                         or parts.password),
                                        ("a query string", parts.query)) if present]
    return " and ".join(found) or None


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to show."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def upstream_reason(text: str, *, limit: int = 200) -> str:
    """The first non-empty line of an upstream answer, redacted and cut to ``limit``."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    line = redact(line)
    return line if len(line) <= limit else line[: limit - 1] + "…"
