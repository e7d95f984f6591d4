"""The face prior of a bundle: the StyleGAN2 generator, the encoder to W+ and the mean W+.

Separate from :class:`~facetier.codec.model.FaceCodec` because a bundle imported from public
checkpoints has a prior before it has entropy models (and may have a generator before it has an
encoder): the fitting stages need W+ codes from such a bundle, and only coding needs the rest.
"""
from __future__ import annotations

import numpy as np
import torch
from facetier.codec.checkpoints import ModelBundle, load_generator_weights
from facetier.codec.encoder import StyleEncoder, inference_encoder, to_encoder_input
from facetier.codec.heap import keep_activations_on_heap
from facetier.codec.stylegan import Generator

from facetier.errors import ModelError


TRAIN_AN_ENCODER = ("train one with `facetier train prior --freeze-generator --init-from-bundle BUNDLE --work DIR`, "
                    "then `facetier train entropy --work DIR --out CODEC_BUNDLE`")


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def reproducible_cuda() -> None:
    """CUDA settings under which a GPU's bytes stay a function of its input: no autotuning (cuDNN's
    benchmark mode may pick another algorithm each run), deterministic algorithms, and no TF32 (it
    keeps 10 bits of mantissa: generated pixels would move by several levels from a CPU's).
    Process-wide, as torch's flags are; a worker process holds one codec."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


class StylePrior:
    """Generator, encoder (when the bundle has one) and ``latent_avg``, on one device, in eval mode."""

    def __init__(self, bundle: ModelBundle, device: str = "auto") -> None:
        cfg = bundle.config
        self.device = pick_device(device)
        if self.device.type == "cuda":
            reproducible_cuda()
        self.generator = Generator(cfg.generator)
        load_generator_weights(self.generator, bundle.prefixed("generator."), ModelError)
        self.generator.to(self.device).eval()
        # NHWC activations: oneDNN's CPU convolutions (depthwise blurs most of all) run 1.2-2x faster
        # in it; outputs differ from NCHW by float rounding only (about 1e-6). CUDA keeps NCHW (not measured there).
        self.memory_format = torch.channels_last if self.device.type == "cpu" else torch.contiguous_format
        if self.device.type == "cpu":
            keep_activations_on_heap()
        self.generator.memory_format = self.memory_format
        self.encoder: StyleEncoder | None = None
        if bundle.has_encoder:
            self.encoder = StyleEncoder(cfg.encoder)
            try:
                self.encoder.load_state_dict(bundle.prefixed("encoder."))
            except RuntimeError as exc:
                raise ModelError(f"encoder weights do not fit the configuration: {str(exc)[:300]}") from exc
            self.encoder = inference_encoder(self.encoder.to(self.device).eval()).to(memory_format=self.memory_format)
        self.latent_avg = bundle.tensors["latent_avg"].float()
        self.encoder_input_size = cfg.encoder.input_size
        self.source = cfg.codec_id

    @torch.no_grad()
    def encode_wplus(self, crops: np.ndarray) -> np.ndarray:
        """(n, S, S, 3) uint8 crops -> (n, n_latent, style_dim) float32 W+."""
        if self.encoder is None:
            raise ModelError(f"{self.source} is a generator without an encoder, so it cannot encode faces: {TRAIN_AN_ENCODER}")
        x = torch.from_numpy(np.require(crops, np.uint8, ['C', 'W'])).to(self.device).permute(0, 3, 1, 2).float().div(127.5).sub(1)
        w = self.encoder(to_encoder_input(x, self.encoder_input_size).contiguous(memory_format=self.memory_format)) + self.latent_avg.to(self.device)[None]
        return w.float().cpu().numpy()

    @torch.no_grad()
    def synthesise(self, wplus: np.ndarray) -> np.ndarray:
        """(n, n_latent, style_dim) W+ -> (n, S, S, 3) uint8 images."""
        y = self.generator(torch.from_numpy(np.asarray(wplus, np.float32)).to(self.device))
        return y.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
