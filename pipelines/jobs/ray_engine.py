"""Ray Data adapters. Encode: from_items(shards) -> map_batches(shard encoder actors), each actor
preparing, encoding and writing whole shards with a ``ShardWorker``, as the local engine does.
Decode and edit: from_items(batches) -> map_batches(decoder actors, one ``BatchDecoder`` each).
Cluster's neighbour graph: from_items(slices of faces) -> map_batches(actors, one ``NeighbourWorker`` each)."""
from __future__ import annotations

import logging
import pickle
from collections.abc import Sequence

import numpy as np
from facetier.pipelines.jobs.decode_records import BatchDecoder, DecodeContext
from facetier.pipelines.jobs.neighbour_graph import Edges, GraphSpec, NeighbourWorker
from facetier.pipelines.jobs.records import JobContext, ShardSpec
from facetier.pipelines.jobs.shard_worker import ShardWorker, shards_per_call

log = logging.getLogger(__name__)

# one block per shard up to this many, so idle actors take a few shards at a time (a call's batch of
# blocks); past it, a block holds a few neighbouring shards
_MAX_ENCODE_BLOCKS = 10_000


class ShardEncoderActor:
    """One ``ShardWorker`` per actor: its pool reads, decodes and aligns the next inputs while the
    model runs, and each shard is written as soon as it is encoded (no shuffle of the faces between
    operators, so the job's steady rate shows in the shards' finish times). Ray gives the actor a
    GPU when the job asks for ``num_gpus``."""

    def __init__(self, ctx: JobContext) -> None:
        import ray
        import torch

        self.worker = ShardWorker(ctx)  # its codec loads on the thread Ray Data runs the calls on
        if ray.get_gpu_ids() and ctx.device != "cpu" and not torch.cuda.is_available():
            log.warning("this encoder actor holds GPU %s but torch sees no CUDA device: is the CPU build of torch installed?", ray.get_gpu_ids())

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"shard_id": np.array([e.shard_id for e in self.worker.run_many(pickle.loads(s) for s in batch["shard"])])}


def init_ray(workers: int, address: str | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        # two logical CPUs a worker: one for its actor, one left for Ray Data's own tasks (which would
        # otherwise wait while the actors hold every CPU); the cores themselves are shared out by torch_threads
        # nothing reads the metrics of a cluster started here for one job (no dashboard, no Prometheus),
        # and collecting them took 4-10 % of the encoder actor's steady rate on 2 cores
        ray.init(num_cpus=2 * max(1, workers), object_store_memory=512 * 1024 * 1024, include_dashboard=False, log_to_driver=False,
                 _system_config={"enable_metrics_collection": False})


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
    if not shards:
        return
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0.0))
    gpus = encoder_gpus(ctx.device, cluster_gpus, gpus_per_worker)
    if gpus > cluster_gpus:
        log.warning("each encoder actor asks for %g GPU but the cluster has %g: Ray waits for GPU nodes to join", gpus, cluster_gpus)
    log.info("ray: %d encoder actor(s), %g GPU each (cluster: %g GPU)", workers, gpus, cluster_gpus)
    # shard specs travel pickled: Arrow strings must be UTF-8, and a file name need not be
    rows = [{"shard": pickle.dumps(s)} for s in shards]
    ds = ray.data.from_items(rows, override_num_blocks=min(len(rows), _MAX_ENCODE_BLOCKS))
    ds.map_batches(ShardEncoderActor, fn_constructor_args=(ctx,), batch_size=shards_per_call(len(shards), workers), concurrency=workers,
                   num_gpus=gpus, batch_format="numpy").materialize()


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


class NeighbourActor:
    """One loaded identity index per actor; each batch of slices comes back as its edges."""

    def __init__(self, spec: GraphSpec) -> None:
        self.worker = NeighbourWorker(spec)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        edges = Edges.concat([self.worker.run(np.frombuffer(rows, np.int64)) for rows in batch["rows"]])
        return {"a": edges.a, "b": edges.b, "distance": edges.distance}


def run_ray_neighbours(spec: GraphSpec, slices: Sequence[np.ndarray], workers: int = 1, address: str | None = None) -> list[Edges]:
    import ray

    init_ray(workers, address)
    # slices travel as bytes: their lengths differ, and Ray Data would make a ragged tensor column of them
    ds = ray.data.from_items([{"rows": np.ascontiguousarray(s, np.int64).tobytes()} for s in slices],
                             override_num_blocks=max(1, min(len(slices), 4 * workers)))
    out = ds.map_batches(NeighbourActor, fn_constructor_args=(spec,), batch_size=1, concurrency=workers, batch_format="numpy")
    return [Edges(b["a"].astype(np.int64), b["b"].astype(np.int64), b["distance"].astype(np.float32))
            for b in out.iter_batches(batch_size=None, batch_format="numpy")]
