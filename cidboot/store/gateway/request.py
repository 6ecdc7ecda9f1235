"""Parsing a trustless-gateway request: path, response format, dag-scope and entity-bytes.

Kept apart from the HTTP server so the rules of the spec can be read (and tested) in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from cidboot.errors import FormatError
from cidboot.ipld.cid import CID

RAW_TYPE = "application/vnd.ipld.raw"
CAR_TYPE = "application/vnd.ipld.car"
SCOPES = ("block", "entity", "all")


class BadRequest(FormatError):
    """The request is malformed (HTTP 400)."""


class NotAcceptable(FormatError):
    """The request asks for a response type a trustless gateway does not serve (HTTP 406)."""


@dataclass(frozen=True)
class GatewayRequest:
    cid: CID
    path: list[str]
    format: str  # "raw" | "car"
    dag_scope: str = "all"
    entity_bytes: tuple[int, int | None] | None = None  # (from, to inclusive) as given; negatives allowed
    car_dups: bool = False
    car_order: str = "dfs"
    filename: str | None = None  # ?filename= names the attachment in Content-Disposition


def _parse_entity_bytes(value: str) -> tuple[int, int | None]:
    lo, sep, hi = value.partition(":")
    if not sep:
        raise BadRequest(f"entity-bytes must be FROM:TO, got {value!r}")
    try:
        start = int(lo)
        end = None if hi == "*" else int(hi)
    except ValueError:
        raise BadRequest(f"entity-bytes must be integers or '*', got {value!r}") from None
    if end is not None and start >= 0 and end >= 0 and end < start:
        raise BadRequest(f"entity-bytes range {value!r} ends before it starts")
    return start, end


def _accept_format(accept: str) -> tuple[str | None, dict[str, str]]:
    """First acceptable type in the Accept header (and its parameters)."""
    for part in accept.split(","):
        fields = [f.strip() for f in part.split(";")]
        mtype = fields[0].lower()
        params = {}
        for f in fields[1:]:
            k, _, v = f.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        if mtype == RAW_TYPE:
            return "raw", params
        if mtype == CAR_TYPE:
            return "car", params
    return None, {}


def parse(target: str, accept: str = "") -> GatewayRequest:
    """Parse an HTTP request target (path and query) and Accept header."""
    try:
        url = urlsplit(target)
    except ValueError as e:  # "//[" is an unterminated IPv6 authority to urlsplit
        raise BadRequest(f"request target {target[:80]!r}: {e}") from None
    parts = [unquote(p) for p in url.path.split("/")]
    if len(parts) < 3 or parts[0] != "" or parts[1] != "ipfs" or not parts[2]:
        raise BadRequest(f"path must be /ipfs/{{cid}}[/path], got {url.path!r}")
    try:
        cid = CID.parse(parts[2])
    except FormatError as e:
        raise BadRequest(str(e)) from None
    path = [p for p in parts[3:] if p]
    if any(p in (".", "..") for p in path):
        raise BadRequest("path segments '.' and '..' are not allowed")
    try:
        q = parse_qs(url.query, keep_blank_values=True, strict_parsing=False)
    except ValueError as e:
        raise BadRequest(f"bad query string: {e}") from None
    fmt_q = q.get("format", [""])[0]
    params: dict[str, str] = {}
    if fmt_q:
        if fmt_q not in ("raw", "car"):
            raise NotAcceptable(f"format={fmt_q} is not served by a trustless gateway (raw or car)")
        fmt: str | None = fmt_q
        if fmt == "car":
            params = _accept_format(accept)[1] if _accept_format(accept)[0] == "car" else {}
    else:
        fmt, params = _accept_format(accept)
        if fmt is None:
            raise NotAcceptable("ask for application/vnd.ipld.raw or application/vnd.ipld.car (Accept or ?format=)")
    if params.get("version", "1") != "1":
        raise NotAcceptable(f"CAR version {params['version']} is not supported (only 1)")
    # IPIP-0523: the car-order / car-dups query parameters win over the Accept parameters
    if "car-order" in q:
        params["order"] = q["car-order"][0]
    if "car-dups" in q:
        params["dups"] = q["car-dups"][0]
    order = params.get("order", "dfs")
    if order not in ("dfs", "unk"):
        raise NotAcceptable(f"CAR order {order} is not supported")
    dups = params.get("dups", "n")
    if dups not in ("y", "n"):
        raise BadRequest(f"CAR dups must be y or n, got {dups!r}")
    scope = q.get("dag-scope", ["all"])[0]
    if scope not in SCOPES:
        raise BadRequest(f"dag-scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    eb = q.get("entity-bytes", [None])[0]
    entity_bytes = _parse_entity_bytes(eb) if eb is not None else None
    filename = q.get("filename", [None])[0]
    if filename is not None and (not filename or any(c in filename for c in '"\\/\r\n') or not (filename.isascii() and filename.isprintable())):
        raise BadRequest(f"filename must be a plain printable ASCII name without quotes or slashes, got {filename!r}")
    assert fmt is not None
    return GatewayRequest(cid, path, fmt, scope, entity_bytes, dups == "y", "dfs", filename)
