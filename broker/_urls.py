"""Broker URLs: the schemes roomcast knows, cluster URL parsing, and redaction for logs.

The one module that says which scheme means what: ``redis://``, ``rediss://`` and
``unix://`` reach one Redis server; ``redis+cluster://`` and ``rediss+cluster://`` reach
a Redis Cluster. No I/O here.
"""

from __future__ import annotations

from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio.connection import parse_url, to_bool

REDIS_SCHEMES: Final = ("redis://", "rediss://", "unix://")
"""URL schemes of one Redis server."""
CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
"""URL schemes of a Redis Cluster (sharded pub/sub)."""

_DEFAULT_PORT: Final = 6379
_CLUSTER_OPTIONS: Final = frozenset({
    "socket_timeout", "socket_connect_timeout", "socket_keepalive", "max_connections",
    "client_name", "require_full_coverage", "ssl_cert_reqs", "ssl_ca_certs",
    "ssl_certfile", "ssl_keyfile", "ssl_check_hostname", "ssl_ciphers", "ssl_min_version",
})
"""Query options a cluster URL may carry; anything else is refused rather than ignored."""


def is_cluster_url(url: str) -> bool:
    """True for ``redis+cluster://`` and ``rediss+cluster://`` URLs (any case)."""
    return url.lower().startswith(CLUSTER_SCHEMES)


def is_redis_url(url: str) -> bool:
    """True for every URL a Redis transport takes: one server or a cluster."""
    return url.lower().startswith(REDIS_SCHEMES + CLUSTER_SCHEMES)


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for logs and error messages."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{hostinfo}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode(
                [(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*/"
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable Redis URL>"


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The startup nodes and client options of a ``redis+cluster://`` URL.

    Form: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...][/[0]][?opts]``
    (``rediss+cluster://`` for TLS). Port defaults to 6379. ValueError says what is wrong.
    """
    if not isinstance(url, str):
        raise TypeError(f"Redis Cluster URL must be a str, got {type(url).__name__}")
    safe = redact_url(url)
    if not is_cluster_url(url):
        raise ValueError(f"{safe}: a Redis Cluster URL starts with redis+cluster:// or "
                         "rediss+cluster://")
    scheme = url.partition("://")[0].lower()
    parts = urlsplit(url)
    userinfo, at, hostlist = parts.netloc.rpartition("@")
    nodes = [_host_port(item, safe) for item in hostlist.split(",")]
    if parts.path not in ("", "/", "/0"):
        raise ValueError(f"{safe}: a Redis Cluster has only database 0; drop {parts.path!r}")
    # redis-py parses credentials and options; one host stands in for all of them
    plain = "rediss" if scheme == "rediss+cluster" else "redis"
    host = hostlist.split(",")[0]
    options: dict[str, Any] = dict(
        parse_url(f"{plain}://{userinfo}{at}{host}/?{parts.query}")
    )
    tls = options.pop("connection_class", None) is not None
    if options.pop("db", 0) != 0:
        raise ValueError(f"{safe}: a Redis Cluster has only database 0")
    options.pop("host", None)
    options.pop("port", None)
    if "protocol" in options or "decode_responses" in options:
        raise ValueError(f"Redis URL {safe}: roomcast speaks RESP2 with raw bytes; "
                         "remove protocol= and decode_responses= from the URL")
    unknown = set(options) - _CLUSTER_OPTIONS - {"username", "password"}
    if unknown:
        raise ValueError(f"{safe}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(_CLUSTER_OPTIONS))}")
    if "require_full_coverage" in options:
        options["require_full_coverage"] = bool(to_bool(options["require_full_coverage"]))
    if tls:
        options["ssl"] = True
    return nodes, options


def _host_port(item: str, safe_url: str) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` of one startup node."""
    item = item.strip()
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port_text = item.rpartition(":") if ":" in item else (item, "", "")
    if not host:
        raise ValueError(f"{safe_url}: every node needs a host, as host:port")
    try:
        port = int(port_text) if port_text else _DEFAULT_PORT
    except ValueError:
        raise ValueError(f"{safe_url}: invalid port {port_text!r}") from None
    if not 0 < port < 65536:
        raise ValueError(f"{safe_url}: invalid port {port}")
    return host, port
