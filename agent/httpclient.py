"""One small HTTP client for the agent's calls to other agents and verifiers (peers' sessions and
inputs, `agent attest`): stdlib http.client, since it runs on the device too, with the URL checked
once and every transport failure turned into one error type the callers can retry on."""

from __future__ import annotations

import http.client
from urllib.parse import urlsplit

from cidboot.errors import CidbootError, FormatError


class BadAgentURL(FormatError):
    """Not an http(s)://HOST[:PORT][/prefix] URL."""


class AgentUnreachable(CidbootError):
    """The connection failed or broke (the message names the URL and the cause): worth retrying."""


def request(method: str, url: str, path: str, *, body: bytes | None = None, ctype: str = "application/json",
            accept: str | None = None, timeout: float = 10.0, user_agent: str = "cidboot-agent") -> tuple[int, bytes]:
    """`method` `url` + `path`; returns (status, body). Non-2xx statuses are returned, not raised:
    callers decide what a 403 or a 503 means."""
    u = urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname:
        raise BadAgentURL(f"URL must be http(s)://HOST[:PORT], got {url!r}")
    cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    headers = {"Content-Type": ctype, "User-Agent": user_agent}
    if accept:
        headers["Accept"] = accept
    try:
        conn = cls(u.hostname, u.port, timeout=timeout)
    except ValueError as e:  # e.g. a port out of range
        raise BadAgentURL(f"{url}: {e}") from None
    try:
        conn.request(method, u.path.rstrip("/") + path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise AgentUnreachable(f"{url}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()
