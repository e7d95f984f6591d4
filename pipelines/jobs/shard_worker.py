"""The objects one encode worker holds for its life: ``FacePreparer`` (a pool that reads, decodes and
aligns inputs ahead of the model) and ``ShardWorker`` (preparer + codec, encoding and writing shards).
The local engine, every Ray actor and every Beam encode DoFn run a ``ShardWorker``."""
from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import Any

import cv2

from facetier.codec.align import FaceDetector
from facetier.codec.face_descriptor import DETECTED_CHIP_ID, FaceDescriptor
from facetier.io.table import ShardEntry
from facetier.pipelines.jobs.records import (
    JobContext,
    ShardSpec,
    encode_items,
    load_worker_codec,
    prepare_source,
    write_shard,
)

log = logging.getLogger(__name__)

# a worker call (a Ray actor's batch, a Beam element) encodes up to this many shards with batches running
# on across them, so only its last batch is padded; fewer when that would leave workers without work
MAX_SHARDS_PER_CALL = 16


def shards_per_call(shards: int, workers: int) -> int:
    """Shards in one worker call: at least about four calls per worker, so a slow one does not hold back the end."""
    return max(1, min(MAX_SHARDS_PER_CALL, shards // (4 * max(1, workers))))


class FacePreparer:
    """The CPU stage's models for one worker: the face detector and, for models that re-detect the
    face in the crop (``dlib-resnet-v1``), dlib's descriptor. The fixed-chip descriptor is a batched
    model call, made with the encoder's batch instead.

    :meth:`prepare_inputs` reads, decodes and aligns shards' inputs in a pool of threads (OpenCV,
    Pillow and JPEG XL release the GIL), so the next inputs are prepared while the caller runs the
    model on the ones before; at most ``prefetch`` inputs are in flight, so memory does not grow
    with the shard. The pool lives as long as the preparer, so its threads, and the detector each
    thread loads for itself, are made once per worker rather than once per shard.
    """

    def __init__(self, ctx: JobContext, threads: int | None = None) -> None:
        self.ctx = ctx
        # The pool runs inputs side by side; OpenCV's own threads inside each detection on top of it
        # cost 15-40 % more CPU per face (10 against 11-14 ms on LFW photos) on cores the model needs.
        # The setting is process-wide: a worker process runs its OpenCV work in this pool.
        cv2.setNumThreads(1)
        self.detector = FaceDetector(ctx.alignment)
        self.descriptor = FaceDescriptor(ctx.descriptor, ctx.alignment.crop_scale, "cpu") if ctx.descriptor == DETECTED_CHIP_ID else None
        self.threads = threads or max(1, min(8, os.cpu_count() or 1))
        self.prefetch = max(2 * ctx.batch_size, 4 * self.threads)
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="facetier-prepare")
        # dlib's detector (the detected-chip descriptor) is not known to be thread-safe: one input at a time then
        self._serial = threading.Lock() if self.descriptor is not None else None

    def prepare(self, shard_id: str, source: str, key: int | None = None) -> list[dict[str, Any]]:
        """The face or reject items of one input (see ``prepare_source``)."""
        if self._serial is None:
            return prepare_source(shard_id, source, self.ctx, self.detector, self.descriptor, key)
        with self._serial:
            return prepare_source(shard_id, source, self.ctx, self.detector, self.descriptor, key)

    def prepare_inputs(self, shards: Iterable[ShardSpec]) -> Iterator[tuple[ShardSpec, list[dict[str, Any]]]]:
        """Each input's items with its shard, in order; the read-ahead runs on across shard boundaries."""
        inputs = ((shard, src, key) for shard in shards for src, key in shard.inputs())

        def submit(shard: ShardSpec, src: str, key: int | None) -> tuple[ShardSpec, Future[list[dict[str, Any]]]]:
            return shard, self._pool.submit(self.prepare, shard.shard_id, src, key)

        pending = deque(submit(*nxt) for nxt in islice(inputs, self.prefetch))
        try:
            while pending:
                shard, future = pending.popleft()
                items = future.result()
                if (nxt := next(inputs, None)) is not None:
                    pending.append(submit(*nxt))
                yield shard, items
        finally:  # a consumer that stops early must not leave inputs nobody will read queued
            for _, f in pending:
                f.cancel()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


class ShardWorker:
    """Holds the CPU stage's models and the codec for one worker: the local engine's, each Ray
    actor's and each Beam encode DoFn's. The model runs on full batches in the thread that calls
    :meth:`run_many` while the preparer's pool reads ahead."""

    def __init__(self, ctx: JobContext, threads: int | None = None) -> None:
        self.ctx = ctx
        self.preparer = FacePreparer(ctx, threads)
        self._codec: Any = None
        self._human: Any = None

    @property
    def codec(self) -> Any:
        """The codec, loaded on first use by the thread that uses it.

        Why not at construction: an engine may build a worker on one thread and call it on another
        (Ray Data builds an actor's UDF on the actor's main thread and runs every call on a thread of
        its own). Each thread that runs torch's parallel operators gets an OpenMP team of its own,
        and with more OpenMP threads than cores libgomp stops spinning between operators: the
        threads then sleep and wake thousands of times a second. Loading on the main thread made a
        Ray actor run at 75 % of the local engine's speed with 15 % of the CPUs idle."""
        if self._codec is None:
            self._codec = load_worker_codec(self.ctx)
            micro = self._codec.micro_batch
            if self.ctx.batch_size % micro:
                log.warning("--batch-size %d is not a multiple of the networks' fixed micro-batch of %d rows: each model step is padded to "
                            "%d rows (no faster, and no smaller in memory, than a batch of that size)",
                            self.ctx.batch_size, micro, -(-self.ctx.batch_size // micro) * micro)
        return self._codec

    @property
    def human(self) -> Any:
        """How this job codes the layers for people (the codec's defaults with the job's budgets)."""
        if self._human is None:
            self._human = self.codec.human_plan(self.ctx.residual_quality, dict(self.ctx.rung_bytes))
        return self._human

    def run_many(self, shards: Iterable[ShardSpec]) -> Iterator[ShardEntry]:
        """Encode and write ``shards`` in order, yielding each shard's entry once it is written.

        Batches fill across shard boundaries, so the networks see full batches and only the last
        batch of the call is padded (to the codec's fixed micro-batch): padding each shard's last
        batch instead cost 8-12 % of the local engine's speed on 64-photo shards.
        """
        results: dict[str, list[dict[str, Any]]] = {}  # shards begun and not yet written, in order
        batch: list[dict[str, Any]] = []

        def encode_batch() -> None:
            for item in encode_items(self.codec, batch, self.ctx.layers, self.human):
                results[item["shard_id"]].append(item)
            batch.clear()

        def write_finished(upto: str | None) -> Iterator[ShardEntry]:
            """Write the shards before ``upto`` (all when None) whose faces are all encoded."""
            waiting = {item["shard_id"] for item in batch}
            for shard_id in list(results):
                if shard_id == upto or shard_id in waiting:
                    return
                yield write_shard(self.ctx, shard_id, results.pop(shard_id))

        for shard, items in self.preparer.prepare_inputs(shards):
            if shard.shard_id not in results:
                yield from write_finished(shard.shard_id)
                results[shard.shard_id] = []
            for item in items:
                (batch if item["kind"] == "face" else results[shard.shard_id]).append(item)
                if len(batch) == self.ctx.batch_size:
                    encode_batch()
                    yield from write_finished(shard.shard_id)
        if batch:
            encode_batch()
        yield from write_finished(None)

    def close(self) -> None:
        self.preparer.close()
