"""What every command-line face shares: help that shows defaults, the environment variables
that stand in for ``--topology`` and ``--name``, and how an error becomes an exit code.

Exit codes: 0 done; 2 the command line or the topology file is wrong (argparse's own
errors, :class:`UsageError`, :class:`TopologyError`, a refused request); 1 a well-formed
command failed while running (model missing, ring unreachable, port in use, ...); 130
interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

from .errors import ContextOverflowError, FlowSpecError, RequestError, TopologyError, UsageError

TOPOLOGY_ENV = "FLOWSPEC_TOPOLOGY"  # default of --topology (node, up, check, chat, generate, bench, profile)
NODE_ENV = "FLOWSPEC_NODE"  # default of `flowspec node --name`
EXIT_RUNTIME = 1
EXIT_USAGE = 2  # argparse's own
EXIT_INTERRUPTED = 130
USAGE_ERRORS: tuple[type[FlowSpecError], ...] = (UsageError, TopologyError, RequestError, ContextOverflowError)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default after its help, unless the help
    already says "(default ...)" or there is none worth showing (None, a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or "(default" in text:
            return text
        if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def use_help_formatter(parser: argparse.ArgumentParser) -> None:
    """HelpFormatter for a parser and, recursively, for all its subcommands."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                use_help_formatter(sub)


def env_value(name: str) -> str | None:
    """The variable's value, or None when it is unset or blank."""
    value = os.environ.get(name, "").strip()
    return value or None


def env_default(name: str) -> str:
    """For a help text: where the default comes from and what it is now."""
    value = env_value(name)
    return f"${name}, now {value!r}" if value else f"${name}, unset now"


def add_topology_option(p: argparse.ArgumentParser, what: str = "the YAML topology of the ring") -> None:
    """--topology FILE, defaulting to $FLOWSPEC_TOPOLOGY (required when that is unset)."""
    env = env_value(TOPOLOGY_ENV)
    p.add_argument("--topology", default=env, required=env is None, metavar="FILE",
                   help=f"{what} (default: {env_default(TOPOLOGY_ENV)})")


def add_node_option(p: argparse.ArgumentParser) -> None:
    """--name NODE, defaulting to $FLOWSPEC_NODE (required when that is unset)."""
    env = env_value(NODE_ENV)
    p.add_argument("--name", default=env, required=env is None, metavar="NODE",
                   help=f"which node of the topology this process is (default: {env_default(NODE_ENV)})")


def drafter_arg(text: str) -> str:
    """argparse type of --drafter: none | lookup | eagle[:PATH] | model:PATH (the syntax is
    :func:`~flowspec.speculative.params.split_drafter`'s)."""
    from .speculative.bounds import FieldError
    from .speculative.params import split_drafter

    try:
        split_drafter(text)
    except FieldError:
        raise argparse.ArgumentTypeError(f"{text!r}: give lookup, none, eagle, eagle:PATH or model:PATH") from None
    return text


def exit_code(error: FlowSpecError) -> int:
    """2 for what the user must change in the command or the topology file, 1 for a failure at run time."""
    return EXIT_USAGE if isinstance(error, USAGE_ERRORS) else EXIT_RUNTIME


def report(prog: str, error: FlowSpecError) -> int:
    """Print the error (each line of it as `prog: error: ...`) and return its exit code."""
    for line in str(error).splitlines() or [type(error).__name__]:
        print(f"{prog}: error: {line}", file=sys.stderr)
    return exit_code(error)


def run_reporting(prog: str, command: Callable[[], int]) -> int:
    """Run a command-line command: a FlowSpecError becomes its lines on stderr and exit 2 or 1
    (see exit_code), Ctrl-C exit 130 -- never a traceback. Shared by `flowspec` and tools/."""
    try:
        return command()
    except FlowSpecError as e:
        return report(prog, e)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
