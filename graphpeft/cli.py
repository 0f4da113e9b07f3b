"""The ``graphpeft`` command line.

::

    graphpeft plan validate PLAN.yaml|PLAN.json [--format yaml|json]
    graphpeft adapter inspect DIR
    graphpeft export MODEL --plan PLAN.yaml --target onnx|ort|executorch --out DIR [--train] [--adapter DIR]
    graphpeft version

Exit status: 0 on success, 2 on bad input (a malformed plan, a missing or corrupted adapter,
a usage error), with the reason on standard error. Heavy modules are imported only by the
sub-commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Optional, Sequence

EXIT_OK = 0
EXIT_BAD_INPUT = 2


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("graphpeft")
    except (ImportError, PackageNotFoundError):  # running from a source tree that is not installed
        from graphpeft import __version__

        return __version__


def _error(message: str) -> int:
    print(f"graphpeft: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


# --- sub-commands -----------------------------------------------------------------------------


def cmd_version(args: argparse.Namespace) -> int:
    """Print the installed graphpeft version."""
    print(f"graphpeft {_version()}")
    return EXIT_OK


def cmd_plan_validate(args: argparse.Namespace) -> int:
    """Parse a plan file (YAML or JSON) and print it normalized (defaults dropped, version set)."""
    from graphpeft.errors import PlanError
    from graphpeft.plan import Plan
    import graphpeft  # noqa: F401  (registers the built-in methods, e.g. "lora")

    path = args.plan
    if not os.path.isfile(path):
        return _error(f"plan file {path!r} does not exist")
    try:
        plan = Plan.from_json(path) if path.lower().endswith(".json") else Plan.from_yaml(path)
    except PlanError as e:
        return _error(f"invalid plan {path}: {e}")
    if args.format == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(plan.to_yaml(), end="")
    print(f"# ok: {len(plan.rules)} rule(s): {', '.join(r.name for r in plan.rules)}", file=sys.stderr)
    return EXIT_OK


def cmd_adapter_inspect(args: argparse.Namespace) -> int:
    """Check an adapter folder (config, checksum, tensors) and print what it holds."""
    from graphpeft.adapter_io import read_adapter
    from graphpeft.errors import AdapterFileError

    if not os.path.isdir(args.folder):
        return _error(f"{args.folder!r} is not a folder: pass the folder that save_adapter() wrote")
    try:
        config, state = read_adapter(args.folder)
    except AdapterFileError as e:
        return _error(str(e))
    print(f"adapter: {os.path.abspath(args.folder)}")
    print(f"format: {config.get('format')} v{config.get('format_version')}, "
          f"saved by graphpeft {config.get('graphpeft_version', '?')}")
    print(f"checksum: sha256 {str(config.get('weights_sha256', ''))[:16]}... ok")
    adapters: dict[str, Any] = config.get("adapters") or {}
    print(f"adapters: {len(adapters)}")
    for layer, rec in adapters.items():
        options = ", ".join(f"{k}={v}" for k, v in (rec.get("config") or {}).items() if k != "targets")
        print(f"  {layer}: {rec.get('method')} scaling={rec.get('scaling')}" + (f" ({options})" if options else ""))
    total = sum(t.numel() for t in state.values())
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    print(f"tensors: {len(state)}, {total:,} values, {nbytes:,} bytes")
    width = max((len(k) for k in state), default=0)
    for name in sorted(state):
        t = state[name]
        print(f"  {name:{width}s}  {str(t.dtype).replace('torch.', ''):8s} {list(t.shape)}")
    plan = config.get("plan")
    if plan is not None:
        import yaml

        print("plan:")
        for line in yaml.safe_dump(plan, sort_keys=False).splitlines():
            print(f"  {line}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    """Compile MODEL with a plan, export it for a runtime, run it there and compare with torch."""
    from .cli_export import CliInputError, run_export
    from .errors import GraphPeftError

    try:
        return run_export(args)
    except (CliInputError, GraphPeftError) as e:
        return _error(str(e))


# --- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(
        prog="graphpeft", description="graphpeft: a compiler for parameter-efficient fine-tuning.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p_version = sub.add_parser("version", help="print the graphpeft version")
    p_version.set_defaults(func=cmd_version)

    p_plan = sub.add_parser("plan", help="work with plan files")
    plan_sub = p_plan.add_subparsers(dest="plan_command", metavar="ACTION")
    plan_sub.required = True
    p_validate = plan_sub.add_parser("validate", help="parse a plan file and print it normalized")
    p_validate.add_argument("plan", help="a plan in YAML (.yaml/.yml) or JSON (.json)")
    p_validate.add_argument("--format", choices=("yaml", "json"), default="yaml",
                            help="output format of the normalized plan (default: yaml)")
    p_validate.set_defaults(func=cmd_plan_validate)

    p_adapter = sub.add_parser("adapter", help="work with saved adapters")
    adapter_sub = p_adapter.add_subparsers(dest="adapter_command", metavar="ACTION")
    adapter_sub.required = True
    p_inspect = adapter_sub.add_parser("inspect", help="check an adapter folder and list its tensors")
    p_inspect.add_argument("folder", help="the folder save_adapter() wrote")
    p_inspect.set_defaults(func=cmd_adapter_inspect)

    from .cli_export import add_parser as add_export_parser

    add_export_parser(sub, cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help (0) and on usage errors (2)
        return int(e.code) if isinstance(e.code, int) else EXIT_BAD_INPUT
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
