"""The ``roomcast`` command: ``roomcast serve`` runs one node with the chat demo.

Every flag has a ROOMCAST_* environment variable (the flag wins); invalid values stop
the process at start-up with a message naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final

from aiohttp import web

from roomcast.broker import create_broker
from roomcast.node._aiohttp import COMPILED_MASK
from roomcast.node.app import NodeOptions, create_app, install_drain
from roomcast.node.auth import MIN_SECRET_BYTES, Auth, JWTAuthenticator, RedactingAccessLogger
from roomcast.node.hub import HUB
from roomcast.node.limits import DEFAULT_HANDSHAKE_TIMEOUT, Limits, RateLimit
from roomcast.node.logs import configure_logging, set_node_id
from roomcast.shared.config import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_PING_INTERVAL_MS,
    DEFAULT_PONG_TIMEOUT_MS,
    DEFAULT_RECOVERY_MAX,
    DEFAULT_SEND_BUFFER_LIMIT,
    DEFAULT_WRITE_BATCH_BYTES,
    MAX_WRITE_DELAY_MS,
    HubConfig,
)
from roomcast.shared.errors import BrokerError
from roomcast.shared.history import (
    MAX_HISTORY_SIZE,
    MAX_HISTORY_TTL,
    MIN_HISTORY_TTL,
    History,
    HistoryPolicy,
)

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

DEFAULT_BACKLOG: Final = 2048
"""Listen backlog of ``roomcast serve`` (aiohttp's own default, 128, overflowed at a few
thousand connects per second: scripts/bench/capacity.py)."""

LOOPS: Final = ("auto", "asyncio", "uvloop")
"""What ``--loop`` takes; ``auto`` is uvloop when it is installed, else asyncio."""

log = logging.getLogger("roomcast.node")


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be 0-65535")
    return value


def _write_delay(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_WRITE_DELAY_MS:
        raise ValueError(f"must be 0 (no delay) to {MAX_WRITE_DELAY_MS} milliseconds")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be > 0")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


def _history_size(text: str) -> int:
    value = int(text)
    if not 0 <= value <= MAX_HISTORY_SIZE:
        raise ValueError(f"must be from 0 (no history) to {MAX_HISTORY_SIZE}")
    return value


def _history_ttl(text: str) -> float:
    value = float(text)
    if not MIN_HISTORY_TTL <= value <= MAX_HISTORY_TTL:
        raise ValueError(f"must be from {MIN_HISTORY_TTL} to {MAX_HISTORY_TTL:.0f} seconds "
                         "(30 days)")
    return value


def _jwt_secret(value: str) -> str:
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ValueError(f"must be at least {MIN_SECRET_BYTES} bytes (make one with: "
                         "openssl rand -hex 32)")
    return value


def _readable_file(value: str) -> str:
    if not os.path.isfile(value) or not os.access(value, os.R_OK):
        raise ValueError("no such readable file")
    return value


def _api_key(value: str) -> str:
    if not value:
        raise ValueError("must not be empty; leave it unset to turn the API off")
    return value


def _log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError("must be text or json")
    return value


def _uvloop_installed() -> bool:
    try:
        importlib.import_module("uvloop")
    except ImportError:
        return False
    return True


def _loop(text: str) -> str:
    value = text.strip().lower()
    if value not in LOOPS:
        raise ValueError(f"must be {', '.join(LOOPS[:-1])} or {LOOPS[-1]}")
    if value == "uvloop" and not _uvloop_installed():
        raise ValueError(
            "uvloop is not installed: pip install 'roomcast[uvloop]', or pass --loop asyncio"
        )
    return value


def resolve_loop(choice: str) -> str:
    """The event loop ``--loop choice`` runs on: asyncio or uvloop (auto picks uvloop
    when it is installed)."""
    if choice == "auto":
        return "uvloop" if _uvloop_installed() else "asyncio"
    return choice


def new_event_loop(name: str) -> asyncio.AbstractEventLoop:
    """A new event loop of the kind ``resolve_loop`` named."""
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def describe_loop(loop: asyncio.AbstractEventLoop) -> str:
    """``uvloop 0.23.0`` or ``asyncio (_UnixSelectorEventLoop)``: what runs, for the log."""
    module = type(loop).__module__.partition(".")[0]
    if module == "uvloop":
        return f"uvloop {sys.modules['uvloop'].__version__}"
    return f"asyncio ({type(loop).__name__})"


async def _log_loop(app: web.Application) -> None:
    log.info("event loop: %s", describe_loop(asyncio.get_running_loop()))
    if not COMPILED_MASK:
        log.warning("aiohttp runs without its C extensions: client frames are unmasked in "
                    "pure Python (a 16 KB message is read about 14 times slower)")


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("must be true or false")


class _Option:
    def __init__(self, flag: str, env: str, parse: Callable[[str], Any], default: Any,
                 help: str, **extra: Any) -> None:
        self.flag, self.env, self.parse, self.default = flag, env, parse, default
        self.help, self.extra = help, extra


_SERVE_OPTIONS = [
    _Option("--host", "ROOMCAST_HOST", str, "0.0.0.0", "address to listen on"),
    _Option("--port", "ROOMCAST_PORT", _port, 8080, "port to listen on"),
    _Option("--redis", "ROOMCAST_REDIS", str, None,
            "broker URL: redis://, rediss://, unix:// or redis+cluster://h1:p1,h2:p2 "
            "(Redis Cluster); none runs one node in-process"),
    _Option("--redis-prefix", "ROOMCAST_REDIS_PREFIX", str, "roomcast",
            "prefix of every Redis channel and key (deployments sharing a Redis differ)"),
    _Option("--heartbeat-ms", "ROOMCAST_HEARTBEAT_MS", _positive, 1000,
            "how often a node refreshes its presence in Redis"),
    _Option("--presence-ttl-ms", "ROOMCAST_PRESENCE_TTL_MS", _positive, 5000,
            "a node silent this long is dead: its members leave every room"),
    _Option("--max-connections", "ROOMCAST_MAX_CONNECTIONS", _positive,
            DEFAULT_MAX_CONNECTIONS, "connections this node accepts; more get HTTP 503"),
    _Option("--max-connections-per-user", "ROOMCAST_MAX_CONNECTIONS_PER_USER",
            _non_negative_int, 0,
            "connections one user (a token's sub) may have open across the cluster; more "
            "get HTTP 429 (0: no limit)"),
    _Option("--max-message-size", "ROOMCAST_MAX_MESSAGE_SIZE", _positive,
            DEFAULT_MAX_MESSAGE_SIZE, "largest message in bytes; larger closes with 1009"),
    _Option("--ping-interval-ms", "ROOMCAST_PING_INTERVAL_MS", _positive,
            DEFAULT_PING_INTERVAL_MS, "keepalive ping interval"),
    _Option("--pong-timeout-ms", "ROOMCAST_PONG_TIMEOUT_MS", _positive,
            DEFAULT_PONG_TIMEOUT_MS, "close a client whose pong is this late (1011)"),
    _Option("--send-buffer-limit", "ROOMCAST_SEND_BUFFER_LIMIT", _positive,
            DEFAULT_SEND_BUFFER_LIMIT,
            "unsent bytes per connection before it is cut off as a slow consumer (1013)"),
    _Option("--write-delay-ms", "ROOMCAST_WRITE_DELAY_MS", _write_delay, 0,
            "collect each client's messages for up to this long and write them in one "
            "system call (less CPU per message, up to this much more latency); 0 writes "
            "once per event-loop turn"),
    _Option("--write-batch-bytes", "ROOMCAST_WRITE_BATCH_BYTES", _positive,
            DEFAULT_WRITE_BATCH_BYTES,
            "with --write-delay-ms, a client's batch is written early once it holds this "
            "many bytes"),
    _Option("--compression", "ROOMCAST_COMPRESSION", _bool, False,
            "negotiate permessage-deflate with clients that offer it",
            nargs="?", const="true"),
    _Option("--allowed-origin", "ROOMCAST_ALLOWED_ORIGINS", str, [],
            "browser origin allowed to connect (repeatable; env: comma-separated; '*' "
            "for any); none means same-origin only", action="append"),
    _Option("--workers", "ROOMCAST_WORKERS", _positive, 1,
            "node processes sharing the port (SO_REUSEPORT); above 1 needs --redis"),
    _Option("--backlog", "ROOMCAST_BACKLOG", _positive, DEFAULT_BACKLOG,
            "connections the kernel queues for each worker before it accepts them (the "
            "kernel caps it at net.core.somaxconn); a full queue drops SYNs, and each "
            "dropped one costs its client a second"),
    _Option("--reuse-port", "ROOMCAST_REUSE_PORT", _bool, False,
            "share the port with other processes (SO_REUSEPORT)", nargs="?", const="true"),
    _Option("--loop", "ROOMCAST_LOOP", _loop, "auto",
            "event loop: asyncio, uvloop, or auto (uvloop when installed); workers use "
            "the same"),
    _Option("--drain-seconds", "ROOMCAST_DRAIN_SECONDS", _positive_float, 10.0,
            "on SIGTERM, how long clients get to receive their 1001 close"),
    _Option("--drain-notice-seconds", "ROOMCAST_DRAIN_NOTICE_SECONDS", _non_negative_float,
            0.0, "on SIGTERM, how long /readyz fails before clients are closed (give the "
            "load balancer time to stop sending new clients here)"),
    _Option("--history-size", "ROOMCAST_HISTORY_SIZE", _history_size, History().size,
            "messages each room keeps for recovery (clients that reconnect get what they "
            "missed; nodes fill gaps after a lost Redis link); 0 turns history off. Every "
            "node and every Publisher process (Publisher(history=...)) sharing the rooms "
            "must use the same --history-size and --history-ttl"),
    _Option("--history-ttl", "ROOMCAST_HISTORY_TTL", _history_ttl, History().ttl,
            "seconds a room's messages are kept for recovery (older ones are dropped even "
            "within --history-size)"),
    _Option("--recovery-max", "ROOMCAST_RECOVERY_MAX", _positive, DEFAULT_RECOVERY_MAX,
            "most messages one reconnecting client is sent; further behind, it is told "
            "recovered: false (reason limit) and reloads its state"),
    _Option("--api-key", "ROOMCAST_API_KEY", _api_key, None,
            "bearer key for the HTTP API under /api; unset leaves the API off"),
    _Option("--jwt-secret", "ROOMCAST_JWT_SECRET", _jwt_secret, None,
            "HS256 secret of the JSON Web Tokens clients connect with (prefer the "
            "environment variable: flags show in ps)"),
    _Option("--jwt-public-key", "ROOMCAST_JWT_PUBLIC_KEY", _readable_file, None,
            "PEM file of the public key of RS256 (RSA) or ES256 (P-256) tokens"),
    _Option("--jwt-jwks", "ROOMCAST_JWT_JWKS", _readable_file, None,
            "JWKS file of the public keys of RS256/ES256 tokens (picked by kid)"),
    _Option("--jwt-audience", "ROOMCAST_JWT_AUDIENCE", str, None,
            "tokens must have this aud"),
    _Option("--jwt-issuer", "ROOMCAST_JWT_ISSUER", str, None, "tokens must have this iss"),
    _Option("--require-auth", "ROOMCAST_REQUIRE_AUTH", _bool, False,
            "refuse WebSocket upgrades without a token (401); without it they connect "
            "anonymously", nargs="?", const="true"),
    _Option("--max-messages-per-second", "ROOMCAST_MAX_MESSAGES_PER_SECOND", _positive_float,
            None, "messages one connection may send per second; over it they are dropped "
                  "and a client that keeps on is closed with 1008"),
    _Option("--max-bytes-per-second", "ROOMCAST_MAX_BYTES_PER_SECOND", _positive_float, None,
            "message bytes one connection may send per second"),
    _Option("--burst", "ROOMCAST_BURST", _positive, None,
            "messages a connection may send at once (default: one second's worth)"),
    _Option("--max-connects-per-address", "ROOMCAST_MAX_CONNECTS_PER_ADDRESS",
            _non_negative_float, 0.0, "new WebSocket connections per second from one "
            "client address; more get 429 (0: off)"),
    _Option("--handshake-timeout", "ROOMCAST_HANDSHAKE_TIMEOUT", _non_negative_float,
            DEFAULT_HANDSHAKE_TIMEOUT, "seconds a new socket has to send its whole "
            "upgrade request before it is closed (0: off)"),
    _Option("--metrics", "ROOMCAST_METRICS", _bool, True,
            "serve Prometheus metrics at /metrics", nargs="?", const="true"),
    _Option("--log-level", "ROOMCAST_LOG_LEVEL", str.upper, "INFO", "logging level"),
    _Option("--log-format", "ROOMCAST_LOG_FORMAT", _log_format, "text",
            "text, or json for one JSON object per line"),
]


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="roomcast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run a node with the chat demo",
                           description="Run a roomcast node with the chat demo.")
    serve.add_argument("--check", action="store_true",
                       help="validate the settings and exit 0 without serving")
    for opt in _SERVE_OPTIONS:
        kwargs = dict(opt.extra)
        if kwargs.get("action") != "append":
            kwargs.setdefault("type", str)
        serve.add_argument(opt.flag, default=None, help=f"{opt.help} [{opt.env}]"
                           + ("" if opt.default in (None, []) else f" (default: {opt.default})"),
                           **kwargs)
    return parser


def _resolve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """Flag, else environment variable, else default; each parsed and validated."""
    values: dict[str, Any] = {}
    for opt in _SERVE_OPTIONS:
        key = opt.flag[2:].replace("-", "_")
        raw = getattr(args, key)
        source = opt.flag
        if raw is None or raw == []:
            env = os.environ.get(opt.env)
            if env is not None:
                raw, source = env, opt.env
                if opt.extra.get("action") == "append":
                    raw = [o for o in env.split(",") if o.strip()]
        if raw is None or raw == []:
            values[key] = opt.default
            continue
        try:
            values[key] = [opt.parse(r) for r in raw] if isinstance(raw, list) else opt.parse(raw)
        except ValueError as exc:
            parser.error(f"{source}: invalid value {raw!r}: {exc}")
    return values


def build_history(values: dict[str, Any]) -> HistoryPolicy | None:
    """The history policy of ``--history-size``/``--history-ttl``: every room keeps the
    same history; None when the size is 0 (no room keeps any)."""
    if values["history_size"] == 0:
        return None
    return HistoryPolicy(History(values["history_size"], values["history_ttl"]))


def build_config(values: dict[str, Any]) -> HubConfig:
    """HubConfig from resolved settings."""
    return HubConfig(
        max_connections=values["max_connections"],
        max_message_size=values["max_message_size"],
        ping_interval_ms=values["ping_interval_ms"],
        pong_timeout_ms=values["pong_timeout_ms"],
        enable_compression=values["compression"],
        allowed_origins=tuple(values["allowed_origin"]),
        send_buffer_limit=values["send_buffer_limit"],
        history=build_history(values),
        recovery_max=values["recovery_max"],
        write_delay_ms=values["write_delay_ms"],
        write_batch_bytes=values["write_batch_bytes"],
        max_connections_per_user=values["max_connections_per_user"],
    )


def build_auth(values: dict[str, Any]) -> Auth | None:
    """Auth from resolved settings (None: every client is anonymous); ValueError
    naming the flag for settings that do not go together or a key that does not load."""
    keys = [flag for flag in ("jwt_secret", "jwt_public_key", "jwt_jwks") if values[flag]]
    if len(keys) > 1:
        raise ValueError("--jwt-secret, --jwt-public-key and --jwt-jwks: give only one")
    if not keys:
        for flag in ("jwt_audience", "jwt_issuer", "require_auth"):
            if values[flag]:
                raise ValueError(f"--{flag.replace('_', '-')} needs --jwt-secret, "
                                 "--jwt-public-key or --jwt-jwks")
        return None
    claims = {"audience": values["jwt_audience"], "issuer": values["jwt_issuer"]}
    if values["jwt_secret"]:
        authenticator = JWTAuthenticator.from_secret(values["jwt_secret"], **claims)
    elif values["jwt_public_key"]:
        try:
            authenticator = JWTAuthenticator.from_public_key_file(values["jwt_public_key"],
                                                                  **claims)
        except ValueError as exc:
            raise ValueError(f"--jwt-public-key: {exc}") from None
    else:
        try:
            authenticator = JWTAuthenticator.from_jwks_file(values["jwt_jwks"], **claims)
        except ValueError as exc:
            raise ValueError(f"--jwt-jwks: {exc}") from None
    return Auth(authenticator, require=values["require_auth"])


def build_limits(values: dict[str, Any]) -> Limits:
    """Limits from resolved settings."""
    rate = None
    if values["max_messages_per_second"] or values["max_bytes_per_second"]:
        rate = RateLimit(messages_per_second=values["max_messages_per_second"],
                         bytes_per_second=values["max_bytes_per_second"],
                         burst=values["burst"])
    elif values["burst"]:
        raise ValueError("--burst needs --max-messages-per-second or --max-bytes-per-second")
    return Limits(rate=rate, connects_per_address=values["max_connects_per_address"],
                  handshake_timeout=values["handshake_timeout"])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``roomcast`` console script."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    values = _resolve(parser, args)
    try:
        config = build_config(values)
        auth = build_auth(values)
        limits = build_limits(values)
        broker = create_broker(
            values["redis"], prefix=values["redis_prefix"],
            heartbeat_interval=values["heartbeat_ms"] / 1000,
            presence_ttl=values["presence_ttl_ms"] / 1000,
        )
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    if values["log_level"] not in logging.getLevelNamesMapping():
        parser.error(f"--log-level: unknown level {values['log_level']!r}")
    if values["workers"] > 1:
        if not values["redis"]:
            parser.error(
                "--workers: each worker is a node of its own; without --redis they cannot "
                "share rooms or reach each other's connections. Pass --redis URL, or use "
                "--workers 1"
            )
        if values["port"] == 0:
            parser.error("--workers: a fixed --port is needed for workers to share it")
    options = NodeOptions(
        api_key=values["api_key"], drain_seconds=values["drain_seconds"],
        metrics=values["metrics"], drain_notice=values["drain_notice_seconds"],
        auth=auth, limits=limits,
    )
    loop = resolve_loop(values["loop"])
    if args.check:
        print("configuration ok", file=sys.stderr)
        return 0
    configure_logging(values["log_level"], values["log_format"])
    if values["workers"] > 1:
        from roomcast.node.supervisor import Supervisor

        argv_list = list(sys.argv[1:] if argv is None else argv)
        # Workers get the notice and drain time plus a margin before they are killed.
        grace = values["drain_notice_seconds"] + values["drain_seconds"] + 5
        return Supervisor(argv_list, values["workers"], grace, loop=loop).run()
    app = create_app(config, broker=broker, options=options)
    install_drain(app)
    set_node_id(app[HUB].node_id)  # the Hub made the id: from now on every log line has it
    app.on_startup.append(_log_loop)
    try:
        web.run_app(app, host=values["host"], port=values["port"], print=_ready_line,
                    reuse_port=values["reuse_port"] or None, loop=new_event_loop(loop),
                    backlog=values["backlog"],
                    access_log_class=RedactingAccessLogger)  # tokens travel in queries
    except BrokerError as exc:
        # Fail fast on a broker that cannot be reached at start-up (wrong URL, password,
        # Redis not up yet): the supervisor or orchestrator restarts us.
        print(f"roomcast: {exc}", file=sys.stderr)
        return 1
    return 0


def _ready_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
