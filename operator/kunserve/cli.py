"""The `kunserve` console command: one subcommand per component.

Only the chosen subcommand's module is imported, so `kunserve gateway` or `kunserve operator` never
pays for `import torch`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module, help). The module exposes `add_arguments(parser)` and `run(args) -> int`.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "agent": ("kunserve.agent.agent_cmd", "run an agent: the engine, its gRPC services and /metrics"),
    "generate": ("kunserve.agent.generate_cmd", "run the engine in-process on one prompt and print the completion"),
    "gateway": ("kunserve.gateway.gateway_cmd", "run the OpenAI-compatible HTTP gateway in front of the agents"),
    "operator": ("kunserve.operator.operator_cmd", "run the Kubernetes operator (ServingPool handlers, via kopf)"),
    "up": ("kunserve.operator.up_cmd", "serve a ServingPool on this machine: redis, agents, gateway, planner"),
    "reconfigure": ("kunserve.operator.reconfigure_cmd", "force a drop or restore (local pool or agents)"),
    "make-model": ("kunserve.agent.model.make_model", "write a seeded tiny checkpoint or convert SmolLM2-135M"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """A parser listing every subcommand; only `command`'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="kunserve", description="KunServe: burst-tolerant LLM serving.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
