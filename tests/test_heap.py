"""The CPU prior keeps large activations on glibc's heap: after the first batch, a batch of the
encoder costs (almost) no page faults, where a fresh mmap per 33 MB activation cost ~1,000 a face."""
from __future__ import annotations

import resource

import numpy as np
import pytest
from facetier.codec.heap import keep_activations_on_heap


def test_the_encoder_reuses_its_activation_memory(embedded_codec):
    if not keep_activations_on_heap():
        pytest.skip("the C library is not glibc: its allocator is not tuned")
    crops = np.random.default_rng(0).integers(0, 255, (16, 128, 128, 3), dtype=np.uint8)
    embedded_codec.encode_wplus(crops)
    embedded_codec.encode_wplus(crops)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    embedded_codec.encode_wplus(crops)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 16 * 100, f"{faults} page faults for one batch of 16"
