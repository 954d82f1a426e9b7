"""The ``safeopt`` command line.

``safeopt check [POLICY]`` validates a policy (a preset, a file, or
``$SAFEOPT_CONFIG``) and prints it; ``safeopt adapters`` lists the installed
adapters. Nothing here imports a framework unless a subcommand needs one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from safeopt._bench import add_bench_parser, add_demo_parser
from safeopt._errors import PolicyError
from safeopt._policy import ENV_VAR, PRESETS, load_policy
from safeopt._registry import installed_adapters
from safeopt._report import add_report_parser


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.policy)
    except PolicyError as err:
        print(f"safeopt: invalid policy: {err}", file=sys.stderr)
        return 2
    source = args.policy or f"${ENV_VAR} or defaults"
    if args.json:
        print(json.dumps(policy.to_dict(), indent=2))
        return 0
    print(f"policy from {source}: valid{' (no-op)' if policy.is_noop else ''}")
    for key, value in policy.to_dict().items():
        print(f"  {key:<22} = {value!r}")
    return 0


def _cmd_adapters(args: argparse.Namespace) -> int:
    rows = installed_adapters()
    if not rows:
        print("no adapter installed")
    for row in rows:
        print(f"{row['name']:<10} {row['value']:<40} {row['status']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser of the ``safeopt`` command."""
    parser = argparse.ArgumentParser(
        prog="safeopt",
        description="Keep training alive when gradients explode: an optimizer wrapper "
        "that clips, penalises and skips according to a policy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser("check", help="validate a policy and print it")
    check.add_argument("policy", nargs="?", default=None,
                       help=f"a preset ({', '.join(PRESETS)}) or a .toml/.yaml/.json file; "
                       f"default: ${ENV_VAR}, then the defaults")
    check.add_argument("--json", action="store_true", help="print the policy as JSON")
    check.set_defaults(func=_cmd_check)
    adapters = sub.add_parser("adapters", help="list the installed framework adapters")
    adapters.set_defaults(func=_cmd_adapters)
    add_report_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the ``safeopt`` command; returns its exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.func(args))
