"""Every image mode Pillow opens decodes to the right pixels, and its face is still found.

A generated face (no real person) is written in each mode and container; the decode must match
the grey or colour values the mode holds, scaled to 8 bits (not clipped), and the face detector
must still find the face.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from facetier.codec.align import AlignmentConfig, FaceDetector, align_faces
from facetier.io.images import decode_image
from PIL import Image


@pytest.fixture(scope="module")
def photo(generated_faces: np.ndarray) -> np.ndarray:
    """A face on a plain background, as the sample archive makes them (256 px)."""
    face = generated_faces[0]
    s = face.shape[0]
    canvas = np.full((2 * s, 2 * s, 3), (150, 130, 120), np.uint8)
    canvas[s // 2 : s // 2 + s, s // 2 : s // 2 + s] = face
    return canvas


def _grey(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("L"), np.float64)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _wide(grey8: np.ndarray, dtype, scale: float) -> np.ndarray:
    return (grey8.astype(np.float64) * scale).round().astype(dtype)


# name -> (encoded bytes from the 8-bit photo, expected 8-bit RGB, tolerance in grey levels)
def _cases(photo: np.ndarray) -> dict[str, tuple[bytes, np.ndarray, float]]:
    g8 = _grey(photo).round().astype(np.uint8)
    grey_rgb = np.repeat(g8[..., None], 3, 2)
    rgba = np.dstack([photo, np.full(photo.shape[:2], 255, np.uint8)])
    rgba[:4, :4, 3] = 0  # a transparent corner: composited on white
    on_white = photo.copy()
    on_white[:4, :4] = 255
    pal = Image.fromarray(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    return {
        "L png": (_encode(Image.fromarray(g8), "PNG"), grey_rgb, 0.5),
        "I;16 png (16-bit grey)": (_encode(Image.fromarray(_wide(g8, np.uint16, 257.0)), "PNG"), grey_rgb, 0.5),
        "I;16 tiff": (_encode(Image.fromarray(_wide(g8, np.uint16, 257.0)), "TIFF"), grey_rgb, 0.5),
        "I;16B tiff": (_encode(Image.frombytes("I;16B", g8.shape[::-1], _wide(g8, ">u2", 257.0).tobytes()), "TIFF"), grey_rgb, 0.5),
        "I 32-bit tiff holding 16-bit grey": (_encode(Image.fromarray(_wide(g8, np.int32, 257.0)), "TIFF"), grey_rgb, 0.5),
        "F tiff in 0-1": (_encode(Image.fromarray((g8 / 255.0).astype(np.float32)), "TIFF"), grey_rgb, 0.5),
        "F tiff in 0-255": (_encode(Image.fromarray(g8.astype(np.float32)), "TIFF"), grey_rgb, 0.5),
        "LA png": (_encode(Image.fromarray(g8).convert("LA"), "PNG"), grey_rgb, 0.5),
        "P png": (_encode(pal, "PNG"), np.asarray(pal.convert("RGB")), 0.5),
        "RGBA png": (_encode(Image.fromarray(rgba), "PNG"), on_white, 0.5),
        "CMYK jpeg": (_encode(Image.fromarray(photo).convert("CMYK"), "JPEG", quality=95), photo, 6.0),
        "CMYK tiff": (_encode(Image.fromarray(photo).convert("CMYK"), "TIFF"), photo, 1.0),
        "RGB webp": (_encode(Image.fromarray(photo), "WEBP", quality=95), photo, 6.0),
        "1-bit png": (_encode(Image.fromarray(photo).convert("1"), "PNG"), np.asarray(Image.fromarray(photo).convert("1").convert("RGB")), 0.5),
    }


CASES = ["L png", "I;16 png (16-bit grey)", "I;16 tiff", "I;16B tiff", "I 32-bit tiff holding 16-bit grey", "F tiff in 0-1",
         "F tiff in 0-255", "LA png", "P png", "RGBA png", "CMYK jpeg", "CMYK tiff", "RGB webp", "1-bit png"]


@pytest.mark.parametrize("case", CASES)
def test_mode_decodes_to_its_values_and_keeps_the_face(case: str, photo: np.ndarray):
    data, expected, tol = _cases(photo)[case]
    out = decode_image(data)
    assert out.rgb.shape == photo.shape and out.rgb.dtype == np.uint8
    assert np.abs(out.rgb.astype(np.float64) - expected).mean() <= tol, f"{case}: mean error {np.abs(out.rgb.astype(float) - expected).mean():.2f}"
    if case != "1-bit png":  # dithered black and white is not a face photo any detector promises to read
        assert len(align_faces(out.rgb, FaceDetector(AlignmentConfig(size=128, crop_scale=0.8)))) >= 1


def test_the_cases_cover_the_wide_modes(photo: np.ndarray):
    """The 16-bit cases really are 16-bit when reopened (a test that silently wrote 8 bits would prove nothing)."""
    cases = _cases(photo)
    assert Image.open(io.BytesIO(cases["I;16 png (16-bit grey)"][0])).mode.startswith("I;16")
    assert Image.open(io.BytesIO(cases["I 32-bit tiff holding 16-bit grey"][0])).mode == "I"
    assert Image.open(io.BytesIO(cases["F tiff in 0-1"][0])).mode == "F"
