"""The `llmcarve` console command."""

from __future__ import annotations

import argparse
import sys

from llmcarve.params import ParamsError, load_params


def check_params(path: str) -> int:
    try:
        params = load_params(path)
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"{path}: ok ({len(params.data.sources)} sources, {len(params.data.domains)} domains, evaluate models: {', '.join(params.evaluate.models)})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmcarve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check-params", help="validate a params file against the schema")
    check.add_argument("path", nargs="?", default="params.yaml")
    args = parser.parse_args(argv)
    if args.command == "check-params":
        return check_params(args.path)
    return 2


if __name__ == "__main__":
    sys.exit(main())
