"""A sample archive facetier builds for itself (no external data): the demo's input.

* faces sampled from the embedded prior (random latents drawn from the entropy models'
  conditional distributions, decoded by the generator), labelled ``generated-*``, pasted on a
  plain background so the detector sees a photo rather than a tight crop;
* broken inputs that must each become one reject row: a zero-byte file, a text file named
  ``.jpg``, a truncated JPEG, an image without a face, a decompression bomb header, and a tar
  with a member that tries to escape (``../``).
"""
from __future__ import annotations

import io as _stdio
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from facetier.codec.entropy import scale_table
from facetier.codec.model import FaceCodec
from PIL import Image

log = logging.getLogger(__name__)


def sample_faces(codec: FaceCodec, n: int, seed: int = 0) -> np.ndarray:
    """(n, S, S, 3) faces drawn from the prior the codec codes with."""
    rng = np.random.default_rng(seed)
    ws = []
    scales = scale_table()
    for _ in range(n):
        context = np.zeros(0, np.int64)
        symbols = []
        for coder in codec.coders:
            mean4, sidx = coder.model.params(context)
            draw = np.rint(mean4 / 4 + rng.standard_normal(mean4.shape) * scales[sidx] * 0.7).astype(np.int64)
            symbols.append(draw)
            context = np.concatenate([context, draw])
        ws.append(codec.wplus_from_symbols(symbols))
    return codec.synthesise(np.stack(ws))


def _as_photo(face: np.ndarray, rng: np.random.Generator) -> Image.Image:
    s = face.shape[0]
    canvas = np.full((s * 2, s * 2, 3), rng.integers(90, 200, 3), np.uint8)
    off = s // 2
    canvas[off : off + s, off : off + s] = face
    return Image.fromarray(canvas)


def _png_bomb() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def build_sample_archive(out_dir: Path, codec: FaceCodec, n_faces: int = 12, seed: int = 0) -> dict[str, int]:
    """Write the sample into ``out_dir``; returns counts of what was written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    faces = sample_faces(codec, n_faces, seed)
    for i, face in enumerate(faces):
        _as_photo(face, rng).save(out_dir / f"generated-{i:03d}.jpg", quality=92)
    good = _stdio.BytesIO()
    _as_photo(faces[0], rng).save(good, format="JPEG", quality=92)
    (out_dir / "broken-empty.jpg").write_bytes(b"")
    (out_dir / "broken-not-an-image.jpg").write_text("this is a text file pretending to be a JPEG\n")
    (out_dir / "broken-truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 3])
    Image.fromarray(np.tile(np.linspace(0, 255, 256, dtype=np.uint8)[None, :, None], (256, 1, 3))).save(out_dir / "broken-no-face.png")
    (out_dir / "broken-bomb.png").write_bytes(_png_bomb())
    with tarfile.open(out_dir / "broken-archive.tar", "w") as tf:
        data = good.getvalue()
        for name in ("inside-ok.jpg", "../escape.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, _stdio.BytesIO(data))
    return {"generated": n_faces, "broken_files": 6, "archive_members": 2}
