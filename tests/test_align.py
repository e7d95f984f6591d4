"""Detection and FFHQ-style alignment on images the tests make, and on real photos when ../shared is there."""
from __future__ import annotations

import numpy as np
import pytest
from facetier.codec.align import (
    AlignmentConfig,
    FaceDetector,
    align_faces,
    alignment_transform,
    paste_back,
)
from facetier.io.images import decode_image

from facetier.errors import FaceTooSmallError, NoFaceError


def _photo(faces: list[np.ndarray], bg: int = 150) -> np.ndarray:
    s = faces[0].shape[0]
    canvas = np.full((s * 2, s * (len(faces) + 1), 3), bg, np.uint8)
    for i, f in enumerate(faces):
        x = s // 2 + i * s
        canvas[s // 2 : s // 2 + s, x : x + s] = f
    return canvas


def test_generated_face_is_found_and_aligned(embedded_codec, generated_faces):
    faces = align_faces(_photo([generated_faces[0]]), embedded_codec.detector)
    assert len(faces) == 1
    f = faces[0]
    assert f.crop.shape == (128, 128, 3)
    assert f.transform.shape == (2, 3)
    assert f.detection.landmarks.shape == (5, 2)


def test_several_faces_yield_several_aligned_faces(embedded_codec, generated_faces):
    faces = align_faces(_photo([generated_faces[0], generated_faces[2]]), embedded_codec.detector)
    assert len(faces) == 2
    xs = sorted(f.detection.box[0] for f in faces)
    assert xs[1] - xs[0] > 64


def test_the_padded_pass_runs_only_for_faces_at_the_frame(embedded_codec, generated_faces, monkeypatch):
    """One detector pass on a photo with room around the face; a tight crop (the face fills the frame)
    is still found, by the second pass on the photo with a margin, whose answer is the one kept."""
    detector = FaceDetector(embedded_codec.detector.config)
    pads: list[int] = []
    one_pass = detector._pass

    def spy(bgr: np.ndarray, pad: int) -> list[np.ndarray]:
        pads.append(pad)
        return one_pass(bgr, pad)

    monkeypatch.setattr(detector, "_pass", spy)
    assert len(detector.detect(_photo([generated_faces[0]]))) == 1
    assert pads == [0]
    pads.clear()
    tight = np.ascontiguousarray(generated_faces[0][8:-8, 8:-8])
    found = detector.detect(tight)
    assert len(found) >= 1 and pads == [0, max(tight.shape[:2]) // 4]
    padded = one_pass(np.ascontiguousarray(tight[:, :, ::-1]), max(tight.shape[:2]) // 4)
    assert np.allclose(found[0].landmarks, max(padded, key=lambda d: d.box[2] * d.box[3]).landmarks)


def test_no_face_is_a_typed_error(embedded_codec):
    with pytest.raises(NoFaceError):
        align_faces(np.tile(np.linspace(0, 255, 200, dtype=np.uint8)[None, :, None], (200, 1, 3)), embedded_codec.detector)


def test_face_too_small_is_a_typed_error(generated_faces):
    detector = FaceDetector(AlignmentConfig(size=128, min_eye_distance=500))
    with pytest.raises(FaceTooSmallError):
        align_faces(_photo([generated_faces[0]]), detector)


def test_transform_maps_eyes_to_fixed_crop_positions():
    lms = np.array([[100, 120], [160, 118], [130, 150], [108, 180], [152, 178]], float)
    m = alignment_transform(lms, 128)
    eyes = (m[:, :2] @ lms[:2].T).T + m[:, 2]
    assert abs(eyes[0, 1] - eyes[1, 1]) < 1.0, "eyes must be level after alignment"
    assert 32 < eyes[0, 0] < 64 and 64 < eyes[1, 0] < 96


def test_paste_back_restores_frame_size(embedded_codec, generated_faces):
    photo = _photo([generated_faces[1]])
    f = align_faces(photo, embedded_codec.detector)[0]
    out = paste_back(photo, f.crop, f.transform)
    assert out.shape == photo.shape
    # pasting the face's own crop back changes the photo only slightly
    assert np.abs(out.astype(int) - photo.astype(int)).mean() < 6


@pytest.mark.shared_data
def test_real_photos_one_face_and_no_face(shared_data, embedded_codec):
    lfw = sorted((shared_data / "lfw" / "images").glob("*/*.jpg"))[:20]
    found = 0
    for p in lfw:
        faces = align_faces(decode_image(p.read_bytes()).rgb, embedded_codec.detector)
        found += len(faces) >= 1
    assert found == len(lfw)
    utk = sorted((shared_data / "utkface" / "images").glob("*.jpg"))[:10]
    assert all(len(align_faces(decode_image(p.read_bytes()).rgb, embedded_codec.detector)) >= 1 for p in utk)
    # a real photo with its face removed (a flat crop of the background corner) has no face
    corner = decode_image(lfw[0].read_bytes()).rgb[:40, :40]
    with pytest.raises((NoFaceError, FaceTooSmallError)):
        align_faces(np.kron(corner, np.ones((4, 4, 1), np.uint8)), embedded_codec.detector)


@pytest.mark.shared_data
def test_real_photos_several_faces(shared_data, embedded_codec):
    photos = [decode_image(p.read_bytes()).rgb for p in sorted((shared_data / "lfw" / "images").glob("*/*.jpg"))[:3]]
    mosaic = np.concatenate(photos, axis=1)
    assert len(align_faces(mosaic, embedded_codec.detector)) >= 3


@pytest.mark.shared_data
def test_a_face_whose_landmarks_collapse_without_the_margin_is_still_found(shared_data, embedded_codec):
    """On this LFW photo the pass without a margin finds the face with its eyes 7 px apart (too small
    to use); the padded pass must then run and find it, as detection did before it had two passes."""
    rgb = decode_image((shared_data / "lfw" / "images" / "Franz_Muentefering" / "Franz_Muentefering_0003.jpg").read_bytes()).rgb
    faces = align_faces(rgb, embedded_codec.detector)
    assert faces[0].detection.eye_distance > 15
