"""The ``facetier train`` command: its arguments, next to the stages they drive (``stages.py``)."""
from __future__ import annotations

import argparse


def _train(a: argparse.Namespace) -> int:
    from facetier.pipelines.training.stages import run_train

    return run_train(a)


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train the face prior and the entropy models (resumable)")
    t.add_argument("stage", choices=["align", "prior", "gan", "entropy", "semantic"])
    t.add_argument("--lists", nargs="+", default=["../shared/data/utkface/train_images.txt", "../shared/data/lfw/train_images.txt"], help="training image lists")
    t.add_argument("--work", default="runs/prior128", help="checkpoints, logs and the face cache")
    t.add_argument("--steps", type=int, help="training steps (default: prior 30000, gan 100000, semantic 3000)")
    t.add_argument("--minutes", type=float, help="stop (and checkpoint) after this many minutes; rerun to resume")
    t.add_argument("--batch-size", type=int, help="prior and gan stages: faces a step (default 8, sized for CPU; a GPU wants 32-64)")
    t.add_argument("--adv-weight", type=float, default=0.02, help="prior stage: weight of the adversarial term (0 turns the discriminator off)")
    t.add_argument("--freeze-generator", action="store_true",
                   help="prior stage: train the encoder only (no adversarial term), against a frozen generator: the work folder's "
                        "prior checkpoint's if there is one, else the `gan` stage's")
    t.add_argument("--out", default="codec/assets/facetier-prior-128.safetensors", help="entropy stage: where to write the bundle")
    t.add_argument("--from-bundle", help="semantic stage: the bundle whose prior it builds on (default: the embedded model)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="semantic stage: override a training setting, e.g. --set lambda_id=2500 (see SemanticTrainConfig)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)
