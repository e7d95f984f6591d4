"""Apache Beam adapters. Encode: Create(shards) -> prepare -> RunInference(encoder) -> GroupByKey -> write.
Decode and edit: Create(batches) -> Reshuffle -> one ``BatchDecoder`` per worker."""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, RunInference
from apache_beam.options.pipeline_options import PipelineOptions
from facetier.pipelines.jobs.decode_records import BatchDecoder, DecodeContext
from facetier.pipelines.jobs.records import (
    JobContext,
    ShardSpec,
    encode_items,
    load_worker_codec,
    write_shard,
)
from facetier.pipelines.jobs.shard_worker import FacePreparer

log = logging.getLogger(__name__)


class FaceEncoderHandler(ModelHandler[dict, dict, Any]):
    """Loads the codec once per worker (CUDA when present) and encodes batches of face items."""

    def __init__(self, ctx: JobContext) -> None:
        super().__init__()
        self._ctx = ctx

    def load_model(self) -> Any:
        return load_worker_codec(self._ctx)

    def run_inference(self, batch: Sequence[dict], model: Any, inference_args: dict | None = None) -> Iterable[dict]:
        return encode_items(model, list(batch), self._ctx.layers, self._ctx.residual_quality, self._ctx.batch_size)

    def batch_elements_kwargs(self) -> dict[str, int]:
        # full batches: the networks run on padded batches of this size anyway (see encode_items)
        return {"min_batch_size": self._ctx.batch_size, "max_batch_size": self._ctx.batch_size}


class PrepareDoFn(beam.DoFn):
    def __init__(self, ctx: JobContext) -> None:
        self._ctx = ctx

    def setup(self) -> None:
        self._preparer = FacePreparer(self._ctx)

    def teardown(self) -> None:
        self._preparer.close()

    def process(self, shard: ShardSpec) -> Iterable[tuple[str, dict]]:
        # fused with RunInference on the same worker thread: the pool prepares the next inputs while the model runs
        for item in self._preparer.prepare_shard(shard):
            yield shard.shard_id, item


def build_pipeline(p: beam.Pipeline, ctx: JobContext, shards: Sequence[ShardSpec]) -> beam.PCollection:
    return (
        p
        | "Shards" >> beam.Create(list(shards))
        | "Spread" >> beam.Reshuffle()
        | "Prepare" >> beam.ParDo(PrepareDoFn(ctx))
        | "Encode" >> RunInference(KeyedModelHandler(FaceEncoderHandler(ctx)))
        | "ByShard" >> beam.GroupByKey()
        | "Write" >> beam.MapTuple(lambda shard_id, items: write_shard(ctx, shard_id, items).shard_id)
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
        build_pipeline(p, ctx, shards)


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
