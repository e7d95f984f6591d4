"""Ray Data adapter: from_items(shards) -> flat_map(prepare) -> map_batches(encoder actors) -> groupby -> write."""
from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from facetier.io.sources import key_bytes
from facetier.pipelines.jobs.records import (
    FacePreparer,
    JobContext,
    ShardSpec,
    encode_items,
    write_shard,
)

log = logging.getLogger(__name__)


class Prepare:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.preparer = FacePreparer(ctx)

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        # sources travel as bytes: Arrow strings must be UTF-8, and a file name need not be
        items = self.preparer.prepare(row["shard_id"], row["source"].decode("utf-8", "surrogatepass"))
        return [{"shard_id": row["shard_id"], "item": pickle.dumps(it)} for it in items]


class EncoderActor:
    """One codec per actor; Ray gives each actor a GPU when the job asks for ``num_gpus``."""

    def __init__(self, ctx: JobContext) -> None:
        from facetier.codec.model import FaceCodec

        self.ctx = ctx
        self.codec = FaceCodec.load(ctx.weights_path, device=ctx.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in batch["item"]]
        out = encode_items(self.codec, items, self.ctx.layers)
        return {"shard_id": batch["shard_id"], "item": np.array([pickle.dumps(it) for it in out], dtype=object)}


def _writer(ctx: JobContext):
    def write(group: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in group["item"]]
        entry = write_shard(ctx, str(group["shard_id"][0]), items)
        return {"shard_id": np.array([entry.shard_id])}

    return write


def init_ray(workers: int, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=max(1, workers), object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)


def run_ray(ctx: JobContext, shards: Sequence[ShardSpec], workers: int = 1, address: str | None = None) -> None:
    import ray
    import torch

    init_ray(workers, address)
    rows = [{"shard_id": s.shard_id, "source": key_bytes(src)} for s in shards for src in s.sources]
    if not rows:
        return
    gpus = 1 if (ctx.device in ("auto", "cuda") and torch.cuda.is_available()) else 0
    ds = ray.data.from_items(rows)
    ds = ds.flat_map(Prepare, fn_constructor_args=(ctx,), concurrency=workers)
    ds = ds.map_batches(EncoderActor, fn_constructor_args=(ctx,), batch_size=ctx.batch_size, concurrency=workers, num_gpus=gpus, batch_format="numpy")
    ds = ds.groupby("shard_id").map_groups(_writer(ctx), batch_format="numpy")
    ds.materialize()
