"""`diffserve` command line: `generate` (one generation, no server) and `serve` (the HTTP server).

Each subcommand's arguments and body live next to the code they drive; this module only dispatches, and
imports lazily so that `diffserve serve` never imports torch in the API process.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from diffserve import __version__
    from diffserve.runtime.cli import add_generate_arguments
    from diffserve.server.cli import add_serve_arguments

    parser = argparse.ArgumentParser(prog="diffserve", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"diffserve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_generate_arguments(
        sub.add_parser("generate", help="generate one image or video and write it to a file")
    )
    add_serve_arguments(sub.add_parser("serve", help="run the OpenAI-compatible HTTP server"))
    return parser


def main(argv: list[str] | None = None) -> int:
    from diffserve import envs

    args = build_parser().parse_args(argv)
    try:
        envs.check_all()  # a bad DIFFSERVE_* value: one line now, not a traceback mid-load
    except envs.EnvError as e:
        print(f"diffserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    if args.command == "generate":
        from diffserve.runtime.cli import run_generate

        return run_generate(args)
    from diffserve.server.cli import run_serve

    return run_serve(args)


if __name__ == "__main__":
    sys.exit(main())
