"""The README's first command: ``facetier demo`` runs every step on the embedded model and balances."""
from __future__ import annotations

from pathlib import Path

from facetier.cli import main


def test_demo_runs_every_step_and_exits_0(tmp_path: Path, capsys):
    assert main(["demo", str(tmp_path / "demo"), "--faces", "3"]) == 0
    out = capsys.readouterr().out
    for step in ("== 1. sample archive", "== 2. facetier encode", "== 3. facetier query", "== 4. facetier decode",
                 "== 5. facetier decode", "--paste-back --gallery", "== 6. facetier search", "== 7. facetier edit"):
        assert step in out
    assert "source file, original" in out and "GENERATED from basic+middle+enhanced" in out
    assert "(balanced)" in out and "NOT BALANCED" not in out
    assert (tmp_path / "demo" / "review" / "gallery.html").exists() and (tmp_path / "demo" / "review" / "manifest.jsonl").exists()
    assert any((tmp_path / "demo" / "edited").glob("*_age+20.png"))
