"""The README's command table and the CLI agree: every subcommand is documented, every documented option exists."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from facetier.cli import build_parser

README = Path(__file__).resolve().parents[1] / "README.md"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _table_rows() -> dict[str, str]:
    rows = {}
    for line in README.read_text().splitlines():
        m = re.match(r"\| `facetier ([a-z-]+)([^`]*)`", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def test_every_subcommand_has_a_readme_row_and_back():
    assert set(_table_rows()) == set(_subcommands())


def test_every_option_in_the_readme_table_exists():
    subs = _subcommands()
    for name, usage in _table_rows().items():
        known = {opt for a in subs[name]._actions for opt in a.option_strings}
        for opt in re.findall(r"(?<![\w-])(--?[a-z][a-z0-9-]*)", usage):
            assert opt in known, f"README documents `facetier {name} {opt}`, which the CLI does not have"
