"""The HTTP layer every web route shares: which hosts may talk to the server, the app with that
check on every route, and a listening site that stays quiet and alive under abuse.

Client mistakes and hostile traffic cost one log line each, never a traceback: DNS rebinding
and foreign pages get 403, malformed HTTP and connections reset mid-request are logged as one
line, and asyncio's `socket.accept() out of system resource` is rate-limited.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from moshi_mlx.web.limits import MAX_REQUEST_LINE_BYTES

log = logging.getLogger("moshi_mlx.web")

# An idle keep-alive connection, or one whose request headers are still incomplete, is closed
# after this long (aiohttp's keep-alive timer covers both).
IDLE_CONNECTION_TIMEOUT_S = 15.0
# A request body not fully sent when its handler has answered is read (and dropped) this long.
LINGERING_TIME_S = 2.0
# The soft limit on open files is raised towards this (at most to the hard limit).
OPEN_FILES_TARGET = 4096
# `socket.accept() out of system resource` is logged at most once per this many seconds.
ACCEPT_ERROR_LOG_INTERVAL_S = 5.0

_ACCEPT_ERROR = "socket.accept() out of system resource"
LOOPBACK_NAMES = ("localhost",)


def _host_name(netloc: str) -> str | None:
    """'Example.COM:8080' -> 'example.com', '[::1]:80' -> '::1'; None when unparsable."""
    try:
        parts = urlsplit("//" + netloc)
        parts.port  # noqa: B018 - raises ValueError for a malformed port
    except ValueError:
        return None
    name = parts.hostname
    if not name or any(ch.isspace() for ch in netloc):
        return None
    return name.rstrip(".") if name != "." else None


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class HostPolicy:
    """Which `Host` and `Origin` headers the server accepts.

    DNS rebinding points a name the attacker controls at this machine, so a page from that
    name reaches the server with the attacker's name in both `Host` and `Origin`. Accepted
    hosts are therefore only names that cannot be rebound: loopback names (localhost,
    *.localhost, 127.x, ::1), IP literals, and the name the server was told to bind.
    A browser's `Origin`, when sent, must name a loopback host (any port) or the request's
    own host; requests without `Host` or `Origin` come from scripts, not pages.
    """

    def __init__(self, bind_host: str):
        self.bind_host = _host_name(bind_host) if bind_host else None

    def host_allowed(self, name: str) -> bool:
        return _is_loopback_name(name) or _is_ip_literal(name) or name == self.bind_host

    def refusal(self, host_header: str | None, origin_header: str | None) -> str | None:
        """Why a request with these headers is refused, or None when it is accepted."""
        host = None
        if host_header is not None:
            host = _host_name(host_header)
            if host is None or not self.host_allowed(host):
                return f"Host {host_header!r} is not this server's name"
        if origin_header is None:
            return None
        origin = urlsplit(origin_header) if "://" in origin_header else None
        origin_host = _host_name(origin.netloc) if origin is not None else None
        if origin_host is None:
            return f"Origin {origin_header!r} is not a web page of this server"
        if _is_loopback_name(origin_host):
            return None
        if origin_host != host or not self.host_allowed(origin_host):
            return f"Origin {origin_header!r} is another site"
        return None


def _host_check(policy: HostPolicy) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        reason = policy.refusal(request.headers.get("Host"), request.headers.get("Origin"))
        if reason is not None:
            log.warning("refused %s %s from %s: %s", request.method, request.path,
                        request.remote, reason)
            raise web.HTTPForbidden(text=f"refused: {reason}\n")
        return await handler(request)

    return check


async def _no_cache_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Cache-Control"] = "no-cache"


def make_app(policy: HostPolicy, *, client_max_size: int) -> web.Application:
    """An app whose every route (pages too) passes `policy`, answers with no-cache, and takes
    request bodies of at most `client_max_size` bytes (larger ones get 413)."""
    app = web.Application(middlewares=[_host_check(policy)], client_max_size=client_max_size)
    app.on_response_prepare.append(_no_cache_headers)
    return app


def websocket_max_msg_size(max_message_bytes: int) -> int:
    """aiohttp's `max_msg_size` that lets messages of exactly `max_message_bytes` through and
    refuses one byte more (close 1009): aiohttp refuses a length >= max_msg_size."""
    return max_message_bytes + 1


def raise_open_files_limit(target: int = OPEN_FILES_TARGET) -> None:
    """Raise the soft limit on open files towards `target` (never above the hard limit):
    macOS starts processes at 256, which a browser's parallel connections can exhaust."""
    try:
        import resource
    except ImportError:  # not a Unix system: nothing to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d to %d: %s",
                        soft, wanted, exc)


def _one_line(text: object, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


class _QuietClientErrors(logging.Filter):
    """aiohttp's "Error handling request" for a client's doing (malformed HTTP, a connection
    reset mid-request) becomes one INFO line without the traceback; our own bugs keep it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, (HttpProcessingError, ConnectionError)):
            return True
        from_peer = "from %s" in str(record.msg) and isinstance(record.args, tuple) and record.args
        peer = record.args[0] if from_peer else "?"  # type: ignore[index]
        if isinstance(exc, HttpProcessingError):
            reason = f"malformed HTTP request from {peer}: {_one_line(exc.message)}"
        else:
            reason = f"client {peer} left mid-request: {_one_line(exc) or type(exc).__name__}"
        _rewrite(record, reason, min(record.levelno, logging.INFO))
        return True


class _RateLimitedAcceptErrors(logging.Filter):
    """asyncio logs a traceback each time accept() fails for lack of file descriptors (every
    retry, per listening socket): one line per ACCEPT_ERROR_LOG_INTERVAL_S instead."""

    def __init__(self) -> None:
        super().__init__()
        self._logged_at = -float("inf")
        self._suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.getMessage().startswith(_ACCEPT_ERROR):
            return True
        now = time.monotonic()
        if now - self._logged_at < ACCEPT_ERROR_LOG_INTERVAL_S:
            self._suppressed += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        more = f" ({self._suppressed} more not logged)" if self._suppressed else ""
        _rewrite(record, f"{_ACCEPT_ERROR}: {_one_line(exc)}; new connections wait{more}",
                 logging.WARNING)
        self._logged_at = now
        self._suppressed = 0
        return True


def _rewrite(record: logging.LogRecord, message: str, level: int) -> None:
    record.msg, record.args = message, ()
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    record.levelno, record.levelname = level, logging.getLevelName(level)


def install_quiet_logging() -> None:
    """The filters above, once per process, on the loggers that emit those records."""
    for name, kind in (("aiohttp.server", _QuietClientErrors),
                       ("asyncio", _RateLimitedAcceptErrors)):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, kind) for existing in logger.filters):
            logger.addFilter(kind())


async def start_site(app: web.Application, host: str, port: int, *,
                     idle_timeout_s: float = IDLE_CONNECTION_TIMEOUT_S) -> web.AppRunner:
    """Listen on host:port (port 0: any free one, see `bound_port`); returns the runner
    (`await runner.cleanup()` stops it). Raises OSError when the address is taken."""
    raise_open_files_limit()
    install_quiet_logging()
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=idle_timeout_s,
                           lingering_time=LINGERING_TIME_S, max_line_size=MAX_REQUEST_LINE_BYTES)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port actually bound (useful with port 0)."""
    for address in runner.addresses:
        return int(address[1])
    raise RuntimeError("server is not listening")


async def serve_until_stopped(app: web.Application, host: str, port: int,
                              ready: Callable[[str], str]) -> None:
    """Listen (an address that cannot be listened on is one MoshiError line), print
    `ready(url)` and, off loopback, a note that other machines can reach it; serve until the
    task is cancelled (Ctrl-C), then close every connection."""
    from moshi_mlx.errors import MoshiError
    from moshi_mlx.web.address import is_loopback, page_url

    try:
        runner = await start_site(app, host, port)
    except OSError as exc:
        raise MoshiError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        print(ready(page_url(host, bound_port(runner))), flush=True)
        if not is_loopback(host):
            print(f"note: listening on {host}, reachable from other machines", flush=True)
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
