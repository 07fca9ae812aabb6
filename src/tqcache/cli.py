"""`tqcache` command line: one sub-command per job, each implemented in the module that owns it.

Each owning module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for its command; this file
only wires them, importing lazily so ``tqcache --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, help)
COMMANDS = {
    "demo": ("tqcache.demo", "quantize real keys/values of a bundled model and print a fidelity table"),
    "generate": ("tqcache.generate", "generate text with a compressed KV cache and report memory/speed"),
    "eval": ("tqcache.evaluate", "fidelity of schemes vs full precision on a real model (KL, top-1, ppl)"),
    "info": ("tqcache.info", "GPU, Triton version, kernel self-tests and launch configurations"),
    "import-dense": ("tqcache.persist_cli", "compress a saved dense cache (safetensors) into a tqcache file"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tqcache", description="TurboQuant-compressed KV caches for transformers")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(p)
        except ModuleNotFoundError as e:  # a command whose module is not installed in this build
            if e.name != module:
                raise
            p.set_defaults(_missing=str(e))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    if getattr(args, "_missing", None):
        print(f"tqcache {args.command}: not available in this build ({args._missing})", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        # Errors we raise carry a message meant for the user; no traceback for them.
        print(f"tqcache {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
