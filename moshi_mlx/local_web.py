"""Talk to Moshi in the browser: `python -m moshi_mlx.local_web [-q 4|8] [--port 8998]`.

Loads the model, then serves a page (echo cancellation, noise suppression and device choice
come from the browser) and a WebSocket at /api/chat that speaks our PCM protocol to our page
and Kyutai's Opus protocol to Kyutai's clients; see moshi_mlx/web/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from moshi_mlx.cli.options import add_model_args, build_engine, command_prog
from moshi_mlx.cli.prompt_args import add_prompt_args, apply_prompt, prompt_plan
from moshi_mlx.errors import MoshiError, cli_errors
from moshi_mlx.web.address import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    check_port_free,
    port,
)
from moshi_mlx.web.http import HostPolicy, serve_until_stopped
from moshi_mlx.web.server import OUR_PAGE, ChatServer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=command_prog("moshi_mlx.local_web", "moshi-web"),
        description="Serve a web page to talk with Moshi through the browser's microphone.",
    )
    add_model_args(parser)
    add_prompt_args(parser)
    web_group = parser.add_argument_group("web server")
    web_group.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"address to listen on (default {DEFAULT_HOST}, this machine only; "
        "0.0.0.0 opens it to your network)",
    )
    web_group.add_argument("--port", type=port, default=DEFAULT_PORT,
                           help=f"port (default {DEFAULT_PORT})")
    web_group.add_argument(
        "--static", metavar="DIR", default=None,
        help="serve this folder's index.html and files at / instead of our page, e.g. a build "
        "of Kyutai's web client (its `dist`); `none`: no page, only /api/chat",
    )
    return parser


def resolve_page(static: str | None) -> str | Path | None:
    """--static -> ChatServer's `page`: our page (no flag), None (`none`) or a checked folder."""
    if static is None:
        return OUR_PAGE
    if static == "none":
        return None
    folder = Path(static)
    if not (folder / "index.html").is_file():
        raise MoshiError(f"--static {static}: no index.html in that folder")
    return folder


@cli_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    prompt = prompt_plan(args)  # the server's own prompt; a client may send its text prompt
    server = ChatServer(page=resolve_page(args.static), prompt=prompt)
    try:
        check_port_free(args.host, args.port)
        print("loading the model…", file=sys.stderr, flush=True)
        server.load_engine(lambda: apply_prompt(build_engine(args), prompt))
        try:
            asyncio.run(serve_until_stopped(
                server.make_app(HostPolicy(args.host)), args.host, args.port,
                lambda url: f"Moshi is ready: open {url} in your browser (Ctrl-C to stop)"))
        except KeyboardInterrupt:
            pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
