"""Who may talk to the agent's HTTP servers: one ASGI middleware in front of both of them, and
the start-up check of where they listen.

* **Exposure.** Listening on anything but loopback without a token is refused unless the user
  says `--insecure-no-auth`; an empty or malformed token is an error, never "no auth".
* **Token.** With a token, every route but the page shells, their assets, /healthz and /metrics
  wants `Authorization: Bearer <token>`. On ingest routes only in that header (`?token=` there
  is a 400): clients are programs, and a token in a URL ends up in logs. A GET may carry
  `?token=`: the UI takes it once in its script, keeps it in the tab, and puts it in download
  links (a link cannot carry a header).
* **Host.** The Host header must be a loopback name, an IP address or a configured name
  (`--allowed-hosts`): a page on a DNS name that an attacker rebinds to 127.0.0.1 sends its
  own name, so it cannot read the agent's API (DNS rebinding).
* **What a web page can send.** Any page can POST to any address without a CORS preflight when
  the Content-Type is missing, `text/plain`, `application/x-www-form-urlencoded` or
  `multipart/form-data` (fetch's CORS-safelisted types). Ingest with such a type needs the
  token, so a page a developer opens cannot write profiles or spans into the local agent
  (CSRF). The real clients send other types: pyroscope-io 1.x `application/proto`, 0.8
  `binary/octet-stream`, the OTel exporter `application/x-protobuf` (or `application/json`).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import socket
from dataclasses import dataclass

from starlette.datastructures import Headers, QueryParams
from starlette.responses import PlainTextResponse

from agent.errors import UsageError

log = logging.getLogger(__name__)

#: What a browser sends cross-origin without a preflight (besides no Content-Type at all).
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded",
                          "multipart/form-data"})
INGEST_PATHS = frozenset({"/ingest", "/push.v1.PusherService/Push", "/v1/traces"})
LOOPBACK_NAMES = ("localhost",)


def public_path(path: str) -> bool:
    """Paths served without the token: page shells and assets carry no data; health and
    metrics are for probes and Prometheus (no profile data in them)."""
    return (path in ("/", "/explore", "/spans", "/flamegraph", "/healthz", "/readyz", "/metrics")
            or path.startswith("/static/") or path.startswith("/trace/"))


def check_token(token: str | None) -> str | None:
    """The token as given, or UsageError for one that cannot be meant (empty, spaces, control or
    non-ASCII characters, which no header carries unchanged). None means no token."""
    if token is None:
        return None
    if not token.strip():
        raise UsageError("the auth token is empty (--auth-token or SPANFLAME_AUTH_TOKEN): set a "
                         "token, e.g. `openssl rand -hex 24`, or unset the variable")
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise UsageError("the auth token must be printable ASCII without spaces")
    return token


def is_loopback_host(host: str) -> bool:
    """True for a listen host that only loopback clients reach."""
    h = host.strip("[]").lower()
    if h in LOOPBACK_NAMES or h.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(h, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback
                               for i in infos)


def check_exposure(listens: list[tuple[str, int]], token: str | None, insecure: bool,
                   can_have_token: bool = True) -> None:
    """UsageError when a server would listen beyond loopback with no token, unless `insecure`.
    `can_have_token`: whether the command has --auth-token (attach and record do not)."""
    exposed = [f"{h}:{p}" for h, p in listens if not is_loopback_host(h)]
    if exposed and token is None and insecure:
        log.warning("listening on %s without an auth token (--insecure-no-auth): anyone who "
                    "reaches it can read profiles and write data", ", ".join(exposed))
    if exposed and token is None and not insecure:
        raise UsageError(
            f"refusing to listen on {', '.join(exposed)} without an auth token: anyone who "
            f"reaches that address could read profiles and write data. "
            + ("Set --auth-token (or SPANFLAME_AUTH_TOKEN), listen" if can_have_token
               else "Listen") + " on 127.0.0.1, or pass --insecure-no-auth")


def parse_allowed_hosts(text: str | None) -> tuple[str, ...]:
    """'a.example, .svc.cluster.local, *' -> names (exact), suffixes (leading dot), or '*'."""
    names = (h.strip().lower().rstrip(".") for h in (text or "").split(","))
    return tuple(h for h in names if h)


def host_allowed(host_header: str, allowed: tuple[str, ...], own: tuple[str, ...] = ()) -> bool:
    """Whether a Host header names the agent: loopback names, IP literals (no DNS, so nothing
    to rebind), this machine's names (`own`) and the configured names or suffixes."""
    h = host_header.strip().lower()
    if h.startswith("["):
        h = h[1:].partition("]")[0]
    elif h.count(":") == 1:
        h = h.partition(":")[0]
    h = h.rstrip(".")
    if not h:
        return False
    if h in LOOPBACK_NAMES or h.endswith(".localhost") or h in own:
        return True
    try:
        ipaddress.ip_address(h)
        return True
    except ValueError:
        pass
    for a in allowed:
        if a == "*" or h == a or (a.startswith(".") and (h.endswith(a) or h == a[1:])):
            return True
    return False


@dataclass(frozen=True)
class Policy:
    token: str | None = None
    allowed_hosts: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, opts) -> "Policy":
        return cls(token=check_token(getattr(opts, "auth_token", None)),
                   allowed_hosts=tuple(getattr(opts, "allowed_hosts", ()) or ()))


class RequestGuard:
    """ASGI middleware enforcing a `Policy` (see the module docstring); bodies pass untouched."""

    def __init__(self, app, policy: Policy) -> None:
        self.app = app
        self.policy = policy
        self._token = policy.token.encode() if policy.token else None
        self._own = (socket.gethostname().lower().rstrip("."),)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self.refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def refusal(self, scope) -> PlainTextResponse | None:
        headers = Headers(scope=scope)
        path = scope.get("path", "")
        host = headers.get("host")
        if host is not None and not host_allowed(host, self.policy.allowed_hosts, self._own):
            return PlainTextResponse(
                f"Host {host[:100]!r} is not a name of this agent: use its IP address or "
                f"localhost, or add the name to --allowed-hosts (SPANFLAME_ALLOWED_HOSTS)\n",
                status_code=403)
        ingest = path in INGEST_PATHS
        query = QueryParams(scope.get("query_string", b""))
        if ingest and "token" in query:
            return PlainTextResponse("a token in the URL of an ingest route is refused (URLs end "
                                     "up in logs): send it as `Authorization: Bearer <token>`\n",
                                     status_code=400)
        authed = False
        if self._token is not None:
            auth = headers.get("authorization", "")
            if auth[:7].lower() == "bearer ":
                given = auth[7:].strip()
            else:  # a link the UI made (a download): GET only, never ingest
                given = query.get("token", "") if scope.get("method") == "GET" else ""
            authed = hmac.compare_digest(given.encode(), self._token)
            if not authed and not public_path(path):
                return PlainTextResponse("missing or wrong bearer token (send it in the "
                                         "Authorization header)\n", status_code=401,
                                         headers={"www-authenticate": "Bearer"})
        if ingest and scope.get("method") == "POST" and not authed:
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if not ctype or ctype in SIMPLE_TYPES:
                return PlainTextResponse(
                    f"Content-Type {ctype or '(none)'!r} is one any web page can send here "
                    f"(cross-site request forgery): send the data as application/octet-stream "
                    f"(or the client's own type), or with the agent's bearer token\n",
                    status_code=415)
        return None
