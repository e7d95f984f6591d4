"""The ``facetier`` command line: one entry point that parses and dispatches.

Each part of ``pipelines`` owns its commands (arguments next to the code they drive): production
jobs in ``pipelines/jobs/commands.py``, training in ``pipelines/training/commands.py``,
evaluation in ``pipelines/evaluation/commands.py``.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from deltalake.exceptions import DeltaError
from facetier import __version__
from facetier.errors import FacetierError, TableCorruptError
from facetier.io.storage import storage_error
from facetier.pipelines.evaluation import commands as evaluation_commands
from facetier.pipelines.jobs import commands as job_commands
from facetier.pipelines.training import commands as training_commands


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="facetier", description="Layered StyleGAN-prior re-encoding of face-photo archives.")
    p.add_argument("--version", action="version", version=f"facetier {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for part in (job_commands, training_commands, evaluation_commands):
        part.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except FacetierError as exc:
        print(f"facetier: {exc.error_class}: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `facetier query ... | head`: the reader left; not a storage failure, nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the interpreter's final flush does not fail again
        return 141
    except (OSError, DeltaError) as exc:
        # the library turns storage failures into StorageError where it knows the table and file; this
        # is the net under it, so a refusal nobody foresaw is still a line, not a traceback (-v: the trace)
        logging.getLogger("facetier").debug("storage failure", exc_info=True)
        where = getattr(args, "table", None) or "storage"
        err = storage_error(exc, where, always=not isinstance(exc, DeltaError)) or \
            TableCorruptError(f"{where}: a Delta log cannot be read ({' '.join(str(exc).split())[:300]}); `facetier check` says what is damaged")
        print(f"facetier: {err.error_class}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
