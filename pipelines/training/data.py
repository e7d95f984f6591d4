"""Training faces: read image lists, align them with the codec's own alignment, cache as uint8.

The cache is a single ``.npy`` (N, S, S, 3) array plus a JSON index of the files used, so that
repeated and resumed training runs read the same faces in the same order.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
from facetier.codec.align import AlignmentConfig, FaceDetector, align_faces
from facetier.io.images import decode_image
from tqdm import tqdm

from facetier.errors import InputError

log = logging.getLogger(__name__)


def read_image_list(list_file: Path) -> list[Path]:
    """Paths in a list file, relative to the list's folder (as in ../shared/data) or absolute."""
    base = list_file.parent
    paths = []
    for line in list_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        if not p.is_absolute():
            p = base / p if (base / p).exists() else base / "images" / p
        paths.append(p)
    return paths


def build_face_cache(image_paths: list[Path], cache_file: Path, config: AlignmentConfig) -> np.ndarray:
    """Align the largest face of every image; images without a usable face are skipped and logged."""
    key = hashlib.sha256(json.dumps([str(p) for p in image_paths] + [repr(config)]).encode()).hexdigest()[:16]
    index_file = cache_file.with_suffix(".json")
    if cache_file.exists() and index_file.exists() and json.loads(index_file.read_text()).get("key") == key:
        return np.load(cache_file, mmap_mode="r")
    detector = FaceDetector(config)
    crops, used, skipped = [], [], 0
    for path in tqdm(image_paths, desc="aligning training faces", unit="img"):
        try:
            faces = align_faces(decode_image(path.read_bytes()).rgb, detector)
        except InputError as exc:
            skipped += 1
            log.debug("skip %s: %s", path, exc)
            continue
        crops.append(faces[0].crop)
        used.append(str(path))
    arr = np.stack(crops)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache_file, arr)
    index_file.write_text(json.dumps({"key": key, "files": used, "skipped": skipped}))
    log.info("aligned %d faces, skipped %d without a usable face", len(used), skipped)
    return np.load(cache_file, mmap_mode="r")
