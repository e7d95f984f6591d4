"""Decode and edit jobs: SQL selections, engines, atomic outputs with a manifest, resume, bad ids,
missing layers, paste-back geometry and the gallery."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from facetier.codec.metrics import psnr
from facetier.io.images import decode_image
from facetier.io.reader import read_family
from facetier.io.sources import SourceRef, read_source
from facetier.io.table import Table
from facetier.pipelines.jobs import decode_records
from facetier.pipelines.jobs.decode import DecodeOptions, run_decode
from facetier.pipelines.jobs.edit import edit
from facetier.pipelines.jobs.encode import EncodeOptions, run_encode
from facetier.pipelines.jobs.selection import select
from PIL import Image

from facetier.cli import main
from facetier.errors import ConfigError


@pytest.fixture(scope="module")
def table(sample_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("decode") / "table")
    run_encode(str(sample_archive), root, EncodeOptions(shard_size=4, progress=False))
    return root


def _faces(root: str) -> list[dict]:
    return read_family(Table(root), "faces", columns=["face_id", "photo_id", "source_uri"]).to_pylist()


def _source(face: dict) -> bytes:
    return read_source(SourceRef.parse(face["source_uri"]))


def _tensor(img: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float() / 255


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), np.int16)


def test_where_selects_through_sql_and_dry_run_only_counts(table: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    everyone = select(table, where="true")
    assert len(everyone.units) == len(_faces(table)) and everyone.units == tuple(sorted(everyone.units))
    women = select(table, where="gender = 'female' OR age > 1000")
    assert set(women.units) < set(everyone.units)
    assert everyone.bytes_read < sum(Table(table).family_bytes().values()) / 2  # ids and the named columns only, no payloads
    assert main(["decode", table, "--where", "true", "--dry-run", "--out", str(tmp_path / "none")]) == 0
    assert f"{len(everyone.units)} selected (dry run" in capsys.readouterr().out
    assert not (tmp_path / "none" / "manifest.jsonl").exists()
    with pytest.raises(ConfigError, match="--ids, --ids-file or --where"):
        select(table)


def test_manifest_balances_and_names_layers_and_generated(table: str, tmp_path: Path) -> None:
    faces = _faces(table)
    res = run_decode(table, [f["face_id"] for f in faces[:2]] + ["no-such-id"], "middle", str(tmp_path), device="cpu", fmt="jpg", quality=70)
    assert res.balanced and res.selected == 3 and res.written == 2
    assert [(f.id, f.error_class) for f in res.failures] == [("no-such-id", "NotInTableError")]
    lines = [json.loads(x) for x in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [x["layers"] for x in lines] == [["basic", "middle"]] * 2 and all(x["generated"] and x["file"].endswith("_middle.jpg") for x in lines)
    failed = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert failed[0]["error_class"] == "NotInTableError"
    assert Image.open(tmp_path / lines[0]["file"]).format == "JPEG"
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / "_facetier").exists()


def test_originals_come_back_byte_for_byte(table: str, sample_archive: Path, tmp_path: Path) -> None:
    face = min(_faces(table), key=lambda f: f["source_uri"])
    res = run_decode(table, None, "original", str(tmp_path), where=f"photo_id = '{face['photo_id']}'")
    assert res.written == 1 and Path(res.files[0].path).read_bytes() == _source(face)


def test_a_rerun_skips_complete_outputs_after_a_kill(table: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_run = decode_records.BatchDecoder.run
    calls = []

    def dies_on_second_batch(self, units, record_as=None):
        calls.append(len(units))
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_run(self, units, record_as)

    monkeypatch.setattr(decode_records.BatchDecoder, "run", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_decode(table, None, "basic", str(tmp_path), where="true", batch_size=2, device="cpu")
    monkeypatch.setattr(decode_records.BatchDecoder, "run", real_run)
    assert len(list(tmp_path.glob("*_basic.png"))) == 2
    # a kill -9 in the middle of a write leaves only a hidden temporary file, never the final name
    victim = sorted(f["face_id"] for f in _faces(table))[-1]
    (tmp_path / f".{victim}_basic.png.0123.tmp").write_bytes(b"half a PNG")
    res = run_decode(table, None, "basic", str(tmp_path), where="true", batch_size=2, device="cpu")
    assert res.balanced and res.present == 2 and res.written == len(_faces(table)) - 2
    assert len((tmp_path / "manifest.jsonl").read_text().splitlines()) == len(_faces(table))


@pytest.fixture
def ray_stopped_after():
    """Stop the in-process Ray a test started: a later `ray job submit --address auto` must find its own head, not this one."""
    yield
    import ray

    ray.shutdown()


@pytest.mark.parametrize("engine", ["beam", "ray"])
def test_engines_write_what_the_local_loop_writes(table: str, tmp_path: Path, engine: str, ray_stopped_after: None) -> None:
    local = run_decode(table, None, "enhanced", str(tmp_path / "local"), where="true", batch_size=3, device="cpu")
    other = run_decode(table, None, "enhanced", str(tmp_path / engine), where="true", batch_size=3, device="cpu", engine=engine, workers=2)
    assert other.balanced and other.written == local.written == len(_faces(table))
    for a, b in zip(local.files, other.files):
        assert Path(a.path).name == Path(b.path).name
        assert np.abs(_pixels(a.path) - _pixels(b.path)).max() <= 1
    assert not (tmp_path / engine / "_facetier").exists()
    edited = edit(table, "true", {"age": "+20"}, str(tmp_path / f"edit-{engine}"), opts=DecodeOptions(engine=engine, workers=2, batch_size=3, device="cpu"))
    alone = edit(table, "true", {"age": "+20"}, str(tmp_path / "edit-local"), opts=DecodeOptions(batch_size=3, device="cpu"))
    assert edited.edited == alone.edited == len(_faces(table))
    assert all(np.abs(_pixels(a) - _pixels(b)).max() <= 1 for a, b in zip(edited.outputs, alone.outputs))


def test_paste_back_puts_the_face_where_it_was(table: str, sample_archive: Path, tmp_path: Path) -> None:
    faces = _faces(table)
    res = run_decode(table, [f["face_id"] for f in faces], "residual", str(tmp_path), paste_back=True, device="cpu")
    assert res.balanced and res.written == len(faces)
    source = {f["face_id"]: _source(f) for f in faces}
    for f in res.files:
        photo = decode_image(source[f.face_id], draft_size=None).rgb
        pasted = np.asarray(Image.open(f.path).convert("RGB"))
        assert pasted.shape == photo.shape and f.layers_used[-1] == "original"
        assert float(psnr(_tensor(pasted), _tensor(photo))) > 28  # the residual decode lands on its own face: a shifted paste would not


def test_a_face_without_its_original_is_a_typed_failure(sample_archive: Path, tmp_path: Path) -> None:
    root = str(tmp_path / "no-original")
    run_encode(str(sample_archive), root, EncodeOptions(progress=False, layers=("basic", "middle", "enhanced")))
    res = run_decode(root, None, "basic", str(tmp_path / "out"), where="true", paste_back=True, device="cpu")
    assert res.balanced and res.written == 0 and res.failures
    assert {f.error_class for f in res.failures} == {"MissingLayerError"}
    res = run_decode(root, None, "residual", str(tmp_path / "out2"), where="true", device="cpu")
    assert res.written == 0 and {f.error_class for f in res.failures} == {"MissingLayerError"}


def test_gallery_page_and_grid(table: str, tmp_path: Path) -> None:
    res = run_decode(table, None, "basic", str(tmp_path), where="true", gallery=True, device="cpu")
    page = (tmp_path / "gallery.html").read_text()
    assert page.count("<figure>") == res.written and "generated" in page and "age " in page
    assert all(Path(f.path).name in page for f in res.files)
    grid = Image.open(io.BytesIO((tmp_path / "gallery.png").read_bytes()))
    assert grid.height == 128 and grid.width == 128 * res.written


@pytest.mark.slow
def test_gallery_renders_in_a_headless_browser(table: str, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium); the page is checked in a real browser only where one is installed")
    res = run_decode(table, None, "enhanced", str(tmp_path), where="true", gallery=True, paste_back=True, device="cpu")
    dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files", "--virtual-time-budget=5000",
                          "--dump-dom", (tmp_path / "gallery.html").as_uri()], capture_output=True, text=True, timeout=120, check=False).stdout
    assert f'data-loaded="{res.written}"' in dom and 'data-broken="0"' in dom


def test_replicated_table_decodes_like_its_source(table: str, tmp_path: Path) -> None:
    """The scale measurements' table: copies of real rows under new ids, each decoding to its source's face."""
    from facetier.pipelines.evaluation.replicated_table import replicate_table

    big = str(tmp_path / "big")
    n = len(_faces(table))
    assert replicate_table(table, big, 2) == 2 * n
    ids = sorted(f["face_id"] for f in _faces(big))
    assert len(ids) == 2 * n and all("r0-" in i or "r1-" in i for i in ids)
    one = _faces(table)[0]["face_id"]
    copy = f"{one.rsplit('-', 1)[0]}r1-{one.rsplit('-', 1)[1]}"
    a = run_decode(table, [one], "basic", str(tmp_path / "a"), device="cpu").files[0].path
    b = run_decode(big, [copy], "basic", str(tmp_path / "b"), device="cpu").files[0].path
    assert np.array_equal(_pixels(a), _pixels(b))


def test_a_zero_byte_file_at_an_output_name_is_written_again(table: str, tmp_path: Path) -> None:
    first = sorted(f["face_id"] for f in _faces(table))[0]
    (tmp_path / f"{first}_basic.png").write_bytes(b"")  # a copy or an upload that stopped before its first byte
    res = run_decode(table, [first], "basic", str(tmp_path), device="cpu")
    assert res.written == 1 and res.present == 0
    assert Image.open(tmp_path / f"{first}_basic.png").size[0] > 0


@pytest.mark.parametrize("bad", [{"limit": -1}, {"batch_size": 0}, {"workers": 0}])
def test_counts_below_their_range_are_typed_errors(table: str, tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError, match="must be"):
        run_decode(table, None, "basic", str(tmp_path), where="true", device="cpu", **bad)
    with pytest.raises(ConfigError, match="--limit"):
        select(table, where="true", limit=-2)
    assert select(table, where="true", limit=0).units == ()


@pytest.mark.parametrize("bad", [{"shard_size": 0}, {"batch_size": -3}, {"workers": 0}, {"max_source_mb": 0}, {"residual_quality": 101}])
def test_encode_options_out_of_range_are_typed_errors(bad: dict) -> None:
    with pytest.raises(ConfigError):
        EncodeOptions(**bad)


@pytest.mark.parametrize("value", ["nan", "+inf", "-inf", "NaN"])
def test_edits_to_a_non_finite_value_are_typed_errors(table: str, tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="finite"):
        edit(table, "true", {"smile": value}, str(tmp_path), device="cpu")


def test_an_output_that_is_a_file_or_cannot_be_created_is_a_typed_error(table: str, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        run_decode(table, None, "basic", str(tmp_path / "a-file"), where="true", device="cpu")
    with pytest.raises(ConfigError, match="cannot be created"):
        run_decode(table, None, "basic", str(tmp_path / "a-file" / "below"), where="true", device="cpu")


def test_a_runaway_query_stops_at_its_limits_with_a_typed_error(table: str, tmp_path: Path) -> None:
    import time

    from facetier.pipelines.jobs.analytics import QueryLimits, run_query

    from facetier.errors import QueryLimitError

    started = time.monotonic()
    with pytest.raises(QueryLimitError, match="time limit of 1 s"):
        run_query(table, "select count(*) from faces, range(100000000) a, range(100000000) b", limits=QueryLimits(seconds=1))
    assert time.monotonic() - started < 30
    with pytest.raises(QueryLimitError, match="memory limit of 64 MB"):
        run_query(table, "select list(range) from faces, range(50000000)", limits=QueryLimits(memory_mb=64))
    with pytest.raises(QueryLimitError, match="time limit"):  # a --where selection runs under the same limits
        run_decode(table, None, "basic", str(tmp_path), device="cpu", query_limits=QueryLimits(seconds=1),
                   where="face_id in (select f.face_id from faces f, range(100000000) a, range(100000000) b)")
    assert run_query(table, "select count(*) as n from faces").table.column("n")[0].as_py() == len(_faces(table))
