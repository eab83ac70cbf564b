"""The ``rbprop`` command line: ``train``, ``evaluate`` and ``compare``.

Each subcommand lives next to the code it drives and contributes two functions,
``add_arguments(parser)`` and ``run(args) -> int``; this module only wires them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .kernels.dispatch import keep_freed_memory

SUBCOMMANDS = {
    "train": ("rbprop.train", "train a model (MLP, BagNet, ViT) exact or sampled"),
    "evaluate": ("rbprop.train", "evaluate a checkpoint on a dataset's test split"),
    "compare": ("rbprop.compare", "compare an op's exact and sampled VJPs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rbprop", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=summary, description=summary)
        getattr(module, f"add_{name}_arguments")(sub)
        sub.set_defaults(handler=getattr(module, f"run_{name}"))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # A training or comparison run allocates and frees the same arrays every step.
    keep_freed_memory()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s"
    )
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
