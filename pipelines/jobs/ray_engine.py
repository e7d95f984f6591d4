"""Ray Data adapters. Encode: from_items(shards) -> flat_map(prepare) -> map_batches(encoder actors) -> groupby -> write.
Decode and edit: from_items(batches) -> map_batches(decoder actors, one ``BatchDecoder`` each)."""
from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np
from facetier.io.sources import key_bytes
from facetier.pipelines.jobs.decode_records import BatchDecoder, DecodeContext
from facetier.pipelines.jobs.records import (
    FacePreparer,
    JobContext,
    ShardSpec,
    encode_items,
    load_worker_codec,
    write_shard,
)

log = logging.getLogger(__name__)


class Prepare:
    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.preparer = FacePreparer(ctx)

    def __call__(self, row: dict[str, Any]) -> list[dict[str, Any]]:
        # sources travel as bytes: Arrow strings must be UTF-8, and a file name need not be
        key = row.get("source_key")
        key = int(key) if key is not None and key == key else None  # a block with no key at all may hold nulls as NaN
        items = self.preparer.prepare(row["shard_id"], row["source"].decode("utf-8", "surrogatepass"), key)
        return [{"shard_id": row["shard_id"], "item": pickle.dumps(it)} for it in items]


class EncoderActor:
    """One codec per actor; Ray gives each actor a GPU when the job asks for ``num_gpus``."""

    def __init__(self, ctx: JobContext) -> None:
        import ray

        self.ctx = ctx
        self.codec = load_worker_codec(ctx)
        if ray.get_gpu_ids() and self.codec.device.type != "cuda":
            log.warning("this encoder actor holds GPU %s but torch sees no CUDA device: is the CPU build of torch installed?", ray.get_gpu_ids())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [pickle.loads(b) for b in batch["item"]]
        out = encode_items(self.codec, items, self.ctx.layers, self.ctx.residual_quality)
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
        # two logical CPUs a worker: its Prepare actor and its encoder actor run side by side (with one,
        # Ray ran them in turn); the cores themselves are shared out by torch_threads
        ray.init(num_cpus=2 * max(1, workers), object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False)


def encoder_gpus(device: str, cluster_gpus: float, gpus_per_worker: float | None = None) -> float:
    """GPUs each encoder actor asks Ray for.

    Decided from the cluster's resources, not the driver's: under a KubeRay RayJob the driver runs
    on the CPU-only head while the GPUs are on the worker group, and an actor that asks for no GPU
    has the devices hidden from it. An explicit ``gpus_per_worker`` (e.g. 0.5 to share a GPU
    between two actors) wins; ``--device cpu`` never asks.
    """
    if device == "cpu":
        return 0.0
    if gpus_per_worker is not None:
        return gpus_per_worker
    return 1.0 if cluster_gpus >= 1 else 0.0


def run_ray(ctx: JobContext, shards: Sequence[ShardSpec], workers: int = 1, address: str | None = None,
            gpus_per_worker: float | None = None) -> None:
    import ray

    init_ray(workers, address)
    rows = [{"shard_id": s.shard_id, "source": key_bytes(src), "source_key": key} for s in shards for src, key in s.inputs()]
    if not rows:
        return
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    gpus = encoder_gpus(ctx.device, cluster_gpus, gpus_per_worker)
    if gpus > cluster_gpus:
        log.warning("each encoder actor asks for %g GPU but the cluster has %g: Ray waits for GPU nodes to join", gpus, cluster_gpus)
    log.info("ray: %d encoder actor(s), %g GPU each (cluster: %g GPU)", workers, gpus, cluster_gpus)
    ds = ray.data.from_items(rows)
    ds = ds.flat_map(Prepare, fn_constructor_args=(ctx,), concurrency=workers)
    ds = ds.map_batches(EncoderActor, fn_constructor_args=(ctx,), batch_size=ctx.batch_size, concurrency=workers, num_gpus=gpus, batch_format="numpy")
    ds = ds.groupby("shard_id").map_groups(_writer(ctx), batch_format="numpy")
    ds.materialize()


class DecoderActor:
    """One codec per actor; each batch leaves its records in the job folder for the driver."""

    def __init__(self, ctx: DecodeContext) -> None:
        self.decoder = BatchDecoder(ctx)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [len(self.decoder.run(list(pickle.loads(units)), record_as=str(bid))) for bid, units in zip(batch["batch_id"], batch["units"])]
        return {"records": np.array(done)}


def run_ray_decode(ctx: DecodeContext, batches: Sequence[tuple[str, list[str]]], workers: int = 1, address: str | None = None,
                   gpus_per_worker: float | None = None) -> None:
    import ray

    init_ray(workers, address)
    gpus = 0.0 if ctx.upto == "original" else encoder_gpus(ctx.device, float(ray.cluster_resources().get("GPU", 0.0)), gpus_per_worker)
    rows = [{"batch_id": bid, "units": pickle.dumps(units)} for bid, units in batches]
    # blocks made up front: a repartition would need a CPU task while the actors hold every CPU
    ds = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 4 * workers)))
    ds.map_batches(DecoderActor, fn_constructor_args=(ctx,), batch_size=1, concurrency=workers, num_gpus=gpus, batch_format="numpy").materialize()
