"""YuNet, the face detector, run through ONNX Runtime.

OpenCV's ``FaceDetectorYN`` runs the same ONNX file through ``cv2.dnn``, which on a CPU took 3x
ONNX Runtime's time for the network (14.4 against 4.8 ms per 320 px photo on one thread), and
detection was the largest share of a worker's CPU after the encoder. This module feeds the network
the way ``FaceDetectorYN`` does (BGR, 0-255, zero-padded on the right and bottom to a multiple of
32) and decodes its outputs as it does: per stride, a score ``sqrt(cls * obj)`` with both clamped to
[0, 1], a box from centre offsets and log sizes, five landmarks from offsets, then non-maximum
suppression on integer boxes. Rows are ``FaceDetectorYN.detect``'s: x, y, w, h, five (x, y)
landmarks, score.

The shipped file fixes its input at 320 x 320; its reshapes all use -1, so the height and width
are made symbolic when the session is built and one session takes any photo size.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort

STRIDES = (8, 16, 32)
_DIVISOR = 32
_OUTPUTS = tuple(f"{kind}_{s}" for kind in ("cls", "obj", "bbox", "kps") for s in STRIDES)


@dataclass(frozen=True)
class YuNetSettings:
    score_threshold: float = 0.6
    nms_threshold: float = 0.3
    top_k: int = 5000


def _any_size_model(path: str) -> bytes:
    """The ONNX file with its input's height and width (and so every output's length) left free."""
    model = onnx.load(path)
    (inp,) = model.graph.input
    dims = inp.type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[1].dim_param = "anchors"
    return model.SerializeToString()


class YuNet:
    """One ONNX Runtime session, safe to share between threads: each call runs on its caller's
    thread (one intra-op thread), so a pool of preparing threads gets one detection per thread."""

    def __init__(self, model_path: str | Path, settings: YuNetSettings | None = None) -> None:
        self.model_path = str(model_path)
        self.settings = settings or YuNetSettings()
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    def _get_session(self) -> ort.InferenceSession:
        if self._session is None:
            with self._lock:
                if self._session is None:
                    opts = ort.SessionOptions()
                    opts.intra_op_num_threads = 1
                    opts.inter_op_num_threads = 1
                    opts.log_severity_level = 3  # the free dimensions draw shape-inference warnings
                    self._session = ort.InferenceSession(_any_size_model(self.model_path), opts, providers=["CPUExecutionProvider"])
        return self._session

    def detect(self, bgr: np.ndarray) -> np.ndarray:
        """(faces, 15) float32 rows for a uint8 BGR image, in its pixel coordinates, best score first."""
        h, w = bgr.shape[:2]
        pad_h, pad_w = -(-h // _DIVISOR) * _DIVISOR, -(-w // _DIVISOR) * _DIVISOR
        blob = np.zeros((1, 3, pad_h, pad_w), np.float32)
        blob[0, :, :h, :w] = bgr.transpose(2, 0, 1)
        outputs = dict(zip(_OUTPUTS, self._get_session().run(list(_OUTPUTS), {"input": blob})))
        rows = np.concatenate([self._decode(outputs, s, pad_h // s, pad_w // s) for s in STRIDES])
        if len(rows) < 2:
            return rows
        boxes = rows[:, :4].astype(np.int32).tolist()  # FaceDetectorYN suppresses on truncated integer boxes
        st = self.settings
        keep = cv2.dnn.NMSBoxes(boxes, rows[:, 14].tolist(), st.score_threshold, st.nms_threshold, 1.0, st.top_k)
        return rows[np.asarray(keep, dtype=np.int64).reshape(-1)]

    def _decode(self, outputs: dict[str, np.ndarray], stride: int, rows: int, cols: int) -> np.ndarray:
        cls = np.clip(outputs[f"cls_{stride}"].reshape(-1), 0, 1)
        obj = np.clip(outputs[f"obj_{stride}"].reshape(-1), 0, 1)
        score = np.sqrt(cls * obj)
        idx = np.flatnonzero(score >= self.settings.score_threshold)
        if not len(idx):
            return np.zeros((0, 15), np.float32)
        cell = np.stack([idx % cols, idx // cols], 1).astype(np.float32)  # (x, y) of each anchor's grid cell
        bbox = outputs[f"bbox_{stride}"].reshape(rows * cols, 4)[idx]
        kps = outputs[f"kps_{stride}"].reshape(rows * cols, 5, 2)[idx]
        size = np.exp(bbox[:, 2:4]) * stride
        centre = (cell + bbox[:, :2]) * stride
        landmarks = (kps + cell[:, None, :]) * stride
        return np.concatenate([centre - size / 2, size, landmarks.reshape(-1, 10), score[idx, None]], 1).astype(np.float32)
