"""Shared fixtures: a tiny random model, the embedded model, and a self-made sample archive."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from facetier.pipelines.training.bundles import make_random_bundle

    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    make_random_bundle(path, size=32, seed=0)
    return path


@pytest.fixture(scope="session")
def tiny_codec(tiny_bundle: Path):
    from facetier.codec.model import FaceCodec

    return FaceCodec.load(tiny_bundle, device="cpu")


@pytest.fixture(scope="session")
def embedded_codec():
    from facetier.codec.model import FaceCodec

    return FaceCodec.load(device="cpu")


@pytest.fixture(scope="session")
def generated_faces(embedded_codec) -> np.ndarray:
    from facetier.pipelines.jobs.sample_archive import sample_faces

    return sample_faces(embedded_codec, 4, seed=1)


@pytest.fixture(scope="session")
def sample_archive(tmp_path_factory: pytest.TempPathFactory, embedded_codec) -> Path:
    from facetier.pipelines.jobs.sample_archive import build_sample_archive

    out = tmp_path_factory.mktemp("sample") / "archive"
    build_sample_archive(out, embedded_codec, n_faces=5, seed=0)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real-face tests need ../shared/data (not present at {SHARED_DATA}); the project never ships that data")
    return SHARED_DATA
