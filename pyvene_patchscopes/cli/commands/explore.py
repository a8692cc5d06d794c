"""`patchscopes explore`: the interactive explorer, a local web page over one model."""

from __future__ import annotations

import argparse
import sys

from ..options import load, model_options, output_options, port_number, positive_int
from ..streams import Stream

EXAMPLE = "patchscopes explore --port 8765"


def register(commands: argparse._SubParsersAction) -> None:
    from ...explore.query import MAX_PROMPT_TOKENS

    p = commands.add_parser(
        "explore",
        help="the interactive explorer: a local web page over one model",
        epilog=f"example: {EXAMPLE}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    output_options(p, "explore")
    model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument(
        "--port", type=port_number, default=8765, help="port to listen on, 0 for any free one (default: %(default)s)"
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the page may be reached by besides localhost, 127.0.0.1 and ::1 (repeatable); "
        "requests naming any other Host are refused (default: none)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help=f"the longest prompt the page accepts, in tokens (default: {MAX_PROMPT_TOKENS})",
    )
    p.set_defaults(func=execute)


def execute(args: argparse.Namespace) -> None:
    from ...explore.app import bind, check_installed, hosts_for, serve
    from ...explore.explorer import Explorer
    from ...explore.query import MAX_PROMPT_TOKENS

    check_installed()  # before the model loads: the app extra (fastapi, uvicorn)
    hosts = hosts_for(args.host, args.allow_host)
    sock = bind(args.host, args.port)  # a port in use is refused before the model loads, not after
    try:
        explorer = Explorer(load(args), max_prompt_tokens=args.max_prompt_tokens or MAX_PROMPT_TOKENS)
    except BaseException:
        sock.close()
        raise
    port = sock.getsockname()[1]
    for stream in (sys.stdout, sys.stderr):  # from here on they are the server's log: a reader that leaves ends
        if isinstance(stream, Stream):  # the log only (its lines are dropped), and the page keeps being served
            stream.on_close = "drop"
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Patchscopes explorer on {explorer.handle.name}: http://{shown}:{port}/  (Ctrl-C stops it)", flush=True)
    serve(explorer, sock, allowed_hosts=hosts)
