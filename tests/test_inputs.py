"""Robust input handling: every kind of bad file is a typed error; odd but valid images decode upright."""
from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from facetier.io.images import decode_image
from facetier.io.sources import (
    SourceRef,
    content_id,
    is_unsafe_member,
    list_sources,
    read_source,
)
from PIL import Image

from facetier.errors import (
    CorruptImageError,
    EmptyFileError,
    ImageTooLargeError,
    NotAnImageError,
    SourceReadError,
    UnsafeMemberError,
)


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **kw)
    return buf.getvalue()


RGB = np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)


def test_exif_orientation_is_applied():
    img = Image.fromarray(RGB)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    out = decode_image(buf.getvalue())
    assert (out.height, out.width) == (20, 30)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "I;16"])
def test_other_modes_become_rgb(mode):
    img = Image.fromarray(RGB).convert(mode) if mode != "I;16" else Image.fromarray(RGB[..., 0].astype(np.uint16) * 256)
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if mode in ("L", "CMYK") else "PNG")
    out = decode_image(buf.getvalue())
    assert out.rgb.shape == (30, 20, 3) and out.rgb.dtype == np.uint8


def test_progressive_jpeg_decodes():
    out = decode_image(_jpeg(RGB, progressive=True, quality=90))
    assert out.format == "JPEG" and out.rgb.shape == (30, 20, 3)


def test_extension_lies_are_sniffed():
    png = io.BytesIO()
    Image.fromarray(RGB).save(png, format="PNG")
    assert decode_image(png.getvalue()).format == "PNG"  # whatever the file was called


@pytest.mark.parametrize(
    "data,error",
    [
        (b"", EmptyFileError),
        (b"hello, I am text", NotAnImageError),
        (_jpeg(RGB)[:100], CorruptImageError),
        (b"\xff\xd8\xff" + b"\x00" * 50, CorruptImageError),
    ],
)
def test_bad_bytes_are_typed_errors(data, error):
    with pytest.raises(error):
        decode_image(data)


def test_pixel_limit_guards_against_bombs():
    with pytest.raises(ImageTooLargeError):
        decode_image(_jpeg(np.zeros((100, 100, 3), np.uint8)), max_pixels=5000)
    from facetier.pipelines.jobs.sample_archive import _png_bomb

    with pytest.raises(ImageTooLargeError):
        decode_image(_png_bomb())


def test_unsafe_member_names():
    for bad in ("../x.jpg", "a/../../x.jpg", "/etc/passwd", "C:\\x.jpg", "a\\..\\..\\x"):
        assert is_unsafe_member(bad), bad
    for ok in ("a/b.jpg", "x..y.jpg", "..hidden/../"[:0] + "dots..jpg"):
        assert not is_unsafe_member(ok), ok


def test_folder_tar_zip_glob_and_list_sources(tmp_path):
    jpg = _jpeg(RGB)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jpg").write_bytes(jpg)
    (tmp_path / "d" / ".hidden").write_bytes(b"x")
    with tarfile.open(tmp_path / "d" / "t.tar", "w") as tf:
        for name in ("in/b.jpg", "../evil.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
    with zipfile.ZipFile(tmp_path / "z.zip", "w") as zf:
        zf.writestr("c.jpg", jpg)
    refs = list_sources(str(tmp_path / "d"))
    assert [r.member for r in refs] == [None, "../evil.jpg", "in/b.jpg"]
    assert read_source(refs[2]) == jpg
    with pytest.raises(UnsafeMemberError):
        read_source(refs[1])
    zrefs = list_sources(str(tmp_path / "z.zip"))
    assert read_source(zrefs[0]) == jpg and zrefs[0].key.endswith("z.zip!c.jpg")
    assert SourceRef.parse(zrefs[0].key) == zrefs[0]
    assert len(list_sources(str(tmp_path / "d" / "*.jpg"))) == 1
    (tmp_path / "list.txt").write_text("d/a.jpg\n# comment\n" + zrefs[0].key + "\n")
    assert len(list_sources(str(tmp_path / "list.txt"))) == 2
    with pytest.raises(SourceReadError):
        read_source(SourceRef(str(tmp_path / "missing.jpg")))
    assert content_id(jpg) == content_id(bytes(jpg)) and len(content_id(jpg)) == 32


def test_only_regular_files_are_read_and_reads_stop_at_the_limit(tmp_path):
    from facetier.errors import NotARegularFileError

    (tmp_path / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "pipe.jpg")
    os.mkfifo(tmp_path / "pipe.tar")  # an "archive" that is a FIFO: not opened to list its members either
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "big.jpg").write_bytes(b"\xff" * 2048)
    (tmp_path / "list.txt").write_text("folder.jpg\n")
    refs = {Path(r.uri).name: r for r in list_sources(str(tmp_path)) if r.member is None}
    assert {"zero.jpg", "pipe.jpg", "pipe.tar", "big.jpg"} <= set(refs)
    for name in ("zero.jpg", "pipe.jpg", "pipe.tar"):  # a read would never end (zero) or block forever (FIFOs)
        with pytest.raises(NotARegularFileError, match="not a regular file"):
            read_source(refs[name])
    (folder,) = list_sources(str(tmp_path / "list.txt"))
    with pytest.raises(NotARegularFileError, match="a directory"):
        read_source(folder)
    with pytest.raises(SourceReadError, match="source limit"):
        read_source(refs["big.jpg"], max_bytes=1024)
    assert read_source(refs["big.jpg"], max_bytes=2048) == b"\xff" * 2048


def test_an_encode_beside_dev_zero_and_a_fifo_rejects_them_and_encodes_the_photos(sample_archive, tmp_path):
    """In a subprocess with a time limit: before, /dev/zero took the machine's memory and a FIFO hung the run."""
    import json
    import shutil
    import subprocess
    import sys

    src = tmp_path / "src"
    src.mkdir()
    for photo in sorted(sample_archive.glob("generated-*.jpg"))[:2]:
        shutil.copy(photo, src / photo.name)
    (src / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(src / "pipe.jpg")
    # peak from /proc (VmHWM): getrusage's ru_maxrss survives exec, so a child of a large pytest process reports the parent's peak
    code = ("import json, re\nfrom facetier.pipelines.jobs.encode import EncodeOptions, run_encode\n"
            f"s = run_encode({str(src)!r}, {str(tmp_path / 'table')!r}, EncodeOptions(progress=False, max_source_mb=5))\n"
            "peak = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "print(json.dumps([s.inputs, s.encoded_inputs, s.rejected, s.rejects_by_class, peak]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    inputs, encoded, rejected, by_class, peak_kb = json.loads(out.stdout.strip().splitlines()[-1])
    assert (inputs, encoded, rejected) == (4, 2, 2)
    assert by_class == {"NotARegularFileError": 2}
    assert peak_kb < 3 * 2**20, f"peak RSS {peak_kb / 2**20:.1f} GB: something read /dev/zero"
