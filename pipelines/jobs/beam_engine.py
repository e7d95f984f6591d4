"""Apache Beam adapters. Encode: Create(groups of shards) -> Reshuffle -> one ``ShardWorker`` per DoFn,
which prepares, encodes and writes whole shards as the local engine does.
Decode and edit: Create(batches) -> Reshuffle -> one ``BatchDecoder`` per worker.
Cluster's neighbour graph: Create(slices of faces) -> Reshuffle -> one ``NeighbourWorker`` per worker."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.options.pipeline_options import PipelineOptions
from facetier.pipelines.jobs.decode_records import BatchDecoder, DecodeContext
from facetier.pipelines.jobs.neighbour_graph import GraphSpec, NeighbourWorker, slice_name
from facetier.pipelines.jobs.records import JobContext, ShardSpec
from facetier.pipelines.jobs.shard_worker import ShardWorker, shards_per_call

log = logging.getLogger(__name__)


class EncodeShardsDoFn(beam.DoFn):
    """One ``ShardWorker`` per DoFn instance, as in the local engine and each Ray actor: its pool
    prepares inputs ahead of the model, batches fill across the shards of an element, and each
    shard is written as soon as its faces are encoded.

    Why not RunInference and a group-by before the write: the runner then holds every encoded
    payload until the group-by ends. The in-process runner did so in memory, 4.0 GB at its peak for
    10,000 LFW photos against 1.0 GB for 1,000; here a worker holds the shard in hand and no more.
    """

    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx

    def setup(self) -> None:
        self._worker = ShardWorker(self._ctx)

    def teardown(self) -> None:
        self._worker.close()

    def process(self, shards: list[ShardSpec]) -> Iterable[str]:
        for entry in self._worker.run_many(shards):
            yield entry.shard_id


def build_pipeline(p: beam.Pipeline, ctx: JobContext, shards: Sequence[ShardSpec], workers: int = 1) -> beam.PCollection:
    per_call = shards_per_call(len(shards), workers)
    groups = [list(shards[i:i + per_call]) for i in range(0, len(shards), per_call)]
    return (
        p
        | "Shards" >> beam.Create(groups)
        | "Spread" >> beam.Reshuffle()
        | "Encode" >> beam.ParDo(EncodeShardsDoFn(ctx))
    )


def pipeline_options(workers: int, extra_args: Sequence[str] = ()) -> PipelineOptions:
    """Local runs use the in-process FnApiRunner; pass ``--runner=DataflowRunner ...`` in extra args for Dataflow."""
    args = list(extra_args)
    if not any(a.startswith("--runner") for a in args):
        args.append("--runner=FnApiRunner")
        if workers > 1:
            args += [f"--direct_num_workers={workers}", "--direct_running_mode=multi_processing"]
    return PipelineOptions(args)


def run_beam(ctx: JobContext, shards: Sequence[ShardSpec], workers: int = 1, extra_args: Sequence[str] = ()) -> None:
    with beam.Pipeline(options=pipeline_options(workers, extra_args)) as p:
        build_pipeline(p, ctx, shards, workers)


class DecodeBatchDoFn(beam.DoFn):
    """Loads the codec once per worker; each batch leaves its records in the job folder for the driver."""

    def __init__(self, ctx: DecodeContext) -> None:
        self._ctx = ctx

    def setup(self) -> None:
        self._decoder = BatchDecoder(self._ctx)

    def process(self, keyed: tuple[str, list[str]]) -> Iterable[int]:
        bid, units = keyed
        yield len(self._decoder.run(units, record_as=bid))


def run_beam_decode(ctx: DecodeContext, batches: Sequence[tuple[str, list[str]]], workers: int = 1, extra_args: Sequence[str] = ()) -> None:
    with beam.Pipeline(options=pipeline_options(workers, extra_args)) as p:
        _ = p | "Batches" >> beam.Create(list(batches)) | "Spread" >> beam.Reshuffle() | "Decode" >> beam.ParDo(DecodeBatchDoFn(ctx))


class NeighbourSliceDoFn(beam.DoFn):
    """Loads the identity index once per worker; each slice's edges go to a file in the job folder."""

    def __init__(self, spec: GraphSpec, job_uri: str) -> None:
        self._spec, self._job_uri = spec, job_uri

    def setup(self) -> None:
        self._worker = NeighbourWorker(self._spec)

    def process(self, rows: np.ndarray) -> Iterable[int]:
        import fsspec

        edges = self._worker.run(rows)
        with fsspec.open(slice_name(self._job_uri, rows), "wb") as fh:
            fh.write(edges.to_bytes())
        yield len(edges)


def run_beam_neighbours(spec: GraphSpec, slices: Sequence[np.ndarray], job_uri: str, workers: int = 1, extra_args: Sequence[str] = ()) -> None:
    with beam.Pipeline(options=pipeline_options(workers, extra_args)) as p:
        _ = (p | "Slices" >> beam.Create(list(slices)) | "Spread" >> beam.Reshuffle()
             | "Neighbours" >> beam.ParDo(NeighbourSliceDoFn(spec, job_uri)))
