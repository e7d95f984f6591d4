"""dlib's face network through ONNX Runtime, for judges that embed many faces without gradients.

The weights are the same: the torch port (:mod:`dlib_resnet`) is exported to ONNX in memory when
the judge starts (nothing is written or downloaded). ONNX Runtime runs it about twice as fast as
torch on a CPU (measured 4.0 against 8.4 ms a face, batch 64, 2 threads), which is what lets
``facetier rd`` score its ~70 settings on the full LFW protocol in under an hour. The outputs agree
with torch's within 1e-5; encode keeps torch, where the base layer's symbols must not depend on the
runtime.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import torch
from facetier.codec.dlib_resnet import CHIP_SIZE, DlibFaceNet

from facetier.errors import ConfigError

TORCH = "torch"
ONNXRUNTIME = "onnxruntime"
RUNTIMES = (TORCH, ONNXRUNTIME)


class OnnxFaceNet:
    """Callable like :class:`DlibFaceNet` on (n, 3, 150, 150) chips in 0–255, without gradients."""

    def __init__(self, net: DlibFaceNet, threads: int | None = None) -> None:
        """``net`` must be on the CPU (ONNX Runtime's CPU provider); it is exported, not changed."""
        if net.projection.device.type != "cpu":
            raise ConfigError("ONNX Runtime runs dlib's face network on the CPU; use runtime 'torch' on other devices")
        example = torch.zeros(2, 3, CHIP_SIZE, CHIP_SIZE)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            # The legacy exporter warns that it is legacy, and that the residual additions' shapes
            # become constants: they are, for the one chip size dlib's network reads.
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (example,), buf, dynamo=False, input_names=["chips"], output_names=["descriptors"],
                              dynamic_axes={"chips": {0: "n"}, "descriptors": {0: "n"}})
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # Codec threads run beside the judge in ``facetier rd``: idle ONNX threads must sleep, not spin.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(buf.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, chips: torch.Tensor) -> torch.Tensor:
        x = np.ascontiguousarray(chips.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run(None, {"chips": x})[0])
