"""dlib's face network in torch: equal to dlib's own call, batched, differentiable, and strict about its file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from facetier.codec.dlib_resnet import (
    CHIP_SIZE,
    DlibFormatError,
    chips_tensor,
    load_dlib_facenet,
)
from facetier.codec.face_descriptor import (
    CHIP_CENTRE,
    CHIP_SIDE,
    DETECTED_CHIP_ID,
    FIXED_CHIP_ID,
    NET_FILE,
    FaceDescriptor,
    crops_to_chips,
    dlib_models,
    models_dir,
)

from facetier.errors import ConfigError

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def net():
    return load_dlib_facenet(models_dir() / NET_FILE)


@pytest.fixture(scope="module")
def reference():
    dlib, models = dlib_models()
    return dlib, dlib.face_recognition_model_v1(str(models / NET_FILE))


def _dlib(reference, chips: np.ndarray) -> np.ndarray:
    _, model = reference
    return np.stack([np.array(model.compute_face_descriptor(np.ascontiguousarray(c))) for c in chips]).astype(np.float32)


def test_architecture_as_dlib_describes_it(net):
    # 5,614,592 parameters in dlib's count; the 7,104 of its affine layers are folded into the convolutions here
    assert sum(p.numel() for p in net.parameters()) + net.projection.numel() == 5_614_592 - 7_104
    assert len(net.blocks) == 14 and tuple(net.projection.shape) == (256, 128)
    np.testing.assert_allclose(net.mean.flatten().numpy(), [122.782, 117.001, 104.298], atol=1e-3)


def test_generated_face_matches_dlib(net, reference, generated_faces):
    """Always runs: the embedded model's own faces, resized to dlib's chip."""
    import cv2

    chips = np.stack([cv2.resize(f, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_LINEAR) for f in generated_faces[:4]])
    with torch.no_grad():
        ours = net(chips_tensor(chips)).numpy()
    assert np.abs(ours - _dlib(reference, chips)).max() <= TOLERANCE


def test_real_faces_match_dlib(net, reference, shared_data):
    """dlib's chips of 24 LFW evaluation photos (its detector and 5 landmarks), ours against its call."""
    from PIL import Image

    dlib, _ = reference
    _, models = dlib_models()
    detector, shape5 = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    names = (shared_data / "lfw" / "eval_images.txt").read_text().split()[:30]
    chips = []
    for name in names:
        rgb = np.array(Image.open(shared_data / "lfw" / "images" / name).convert("RGB"))
        dets = detector(rgb, 1)
        if dets:
            chips.append(np.asarray(dlib.get_face_chip(rgb, shape5(rgb, dets[0]), CHIP_SIZE, 0.25)))
    assert len(chips) >= 24
    chips = np.stack(chips)
    with torch.no_grad():
        ours = net(chips_tensor(chips)).numpy()
    assert np.abs(ours - _dlib(reference, chips)).max() <= TOLERANCE


def test_batched_equals_one_at_a_time_and_has_gradients(net, generated_faces):
    crops = chips_tensor(generated_faces[:3]).requires_grad_(True)
    batch = net(crops_to_chips(crops, 0.8))
    one = torch.cat([net(crops_to_chips(crops[i:i + 1], 0.8)) for i in range(3)])
    torch.testing.assert_close(batch, one, atol=1e-4, rtol=0)
    batch.norm(dim=1).sum().backward()
    assert crops.grad is not None and crops.grad.abs().sum() > 0


def test_descriptor_methods_agree_on_identity(generated_faces):
    """The fixed warp and dlib's re-detection see the same person (dlib's threshold is 0.6)."""
    crops = generated_faces[:4]
    fixed = FaceDescriptor(FIXED_CHIP_ID, 0.8).embed_crops(crops)
    detected = FaceDescriptor(DETECTED_CHIP_ID, 0.8).embed_crops(crops)
    assert np.linalg.norm(fixed - detected, axis=1).max() < 0.4


def test_fixed_chip_sits_where_dlib_puts_it(shared_data):
    """The fixed chip's constants against dlib's own placement on 60 LFW evaluation crops."""
    import cv2
    from facetier.codec.align import AlignmentConfig, FaceDetector, align_faces
    from PIL import Image

    dlib, models = dlib_models()
    detector, shape5 = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
    align = FaceDetector(AlignmentConfig(size=128, crop_scale=0.8))
    found = []
    for name in (shared_data / "lfw" / "eval_images.txt").read_text().split()[:60]:
        crop = align_faces(np.array(Image.open(shared_data / "lfw" / "images" / name).convert("RGB")), align)[0].crop
        img = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_CUBIC)
        dets = detector(img, 0)
        if dets:
            chip = dlib.get_face_chip_details(shape5(img, dets[0]), CHIP_SIZE, 0.25)
            found.append((chip.rect.center().x / 256, chip.rect.center().y / 256, chip.rect.width() / 256))
    cx, cy, side = np.median(np.array(found), 0)
    assert abs(0.5 + (cx - 0.5) * 0.8 - CHIP_CENTRE[0]) < 0.015
    assert abs(0.5 + (cy - 0.5) * 0.8 - CHIP_CENTRE[1]) < 0.015
    assert abs(side * 0.8 - CHIP_SIDE) < 0.03


def test_a_file_that_is_not_the_network_is_refused(tmp_path):
    data = (models_dir() / NET_FILE).read_bytes()
    truncated = tmp_path / "truncated.dat"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DlibFormatError, match="ends"):
        load_dlib_facenet(truncated)
    other = tmp_path / "shape.dat"
    other.write_bytes((models_dir() / "shape_predictor_5_face_landmarks.dat").read_bytes())
    with pytest.raises(DlibFormatError):
        load_dlib_facenet(other)
    with pytest.raises(ConfigError, match="missing"):
        load_dlib_facenet(tmp_path / "absent.dat")


def test_unknown_descriptor_method_is_refused():
    with pytest.raises(ConfigError, match="unknown face descriptor"):
        FaceDescriptor("arcface")


def test_onnxruntime_judge_equals_torch_and_dlib(reference, generated_faces):
    """The judges' ONNX Runtime path: the same network exported in memory, any batch size, within
    the port's tolerance of dlib and of torch; gradients stay torch's."""
    import cv2
    from facetier.codec.facenet_onnx import ONNXRUNTIME


    crops = generated_faces[:5]
    fast = FaceDescriptor(FIXED_CHIP_ID, 0.8, runtime=ONNXRUNTIME)
    torch_ = FaceDescriptor(FIXED_CHIP_ID, 0.8)
    assert np.abs(fast.embed_crops(crops) - torch_.embed_crops(crops)).max() <= 1e-5
    assert np.abs(fast.embed_crops(crops[:1]) - torch_.embed_crops(crops[:1])).max() <= 1e-5
    chips = np.stack([cv2.resize(f, (CHIP_SIZE, CHIP_SIZE), interpolation=cv2.INTER_LINEAR) for f in crops[:3]])
    assert np.abs(fast.embed_chips(chips) - _dlib(reference, chips)).max() <= TOLERANCE
    assert fast.embed_tensor(chips_tensor(crops[:2]).requires_grad_(True)).requires_grad


def test_unknown_runtime_is_refused():
    with pytest.raises(ConfigError, match="unknown runtime"):
        FaceDescriptor(FIXED_CHIP_ID, runtime="tensorrt")
