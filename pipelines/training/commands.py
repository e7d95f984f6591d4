"""The training commands: ``facetier train STAGE`` (stages in ``stages.py``) and ``facetier import-prior``."""
from __future__ import annotations

import argparse


def _train(a: argparse.Namespace) -> int:
    from facetier.pipelines.training.stages import run_train

    return run_train(a)


def _import_prior(a: argparse.Namespace) -> int:
    from pathlib import Path

    from facetier.pipelines.training.import_prior import import_prior

    result = import_prior(Path(a.out), stylegan=Path(a.stylegan) if a.stylegan else None, encoder=Path(a.encoder) if a.encoder else None,
                          codec_id=a.codec_id, generator_license=a.generator_license, encoder_license=a.encoder_license, new_encoder=a.new_encoder)
    print(result.render())
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("train", help="train the face prior and the entropy models (resumable)")
    t.add_argument("stage", choices=["align", "prior", "gan", "entropy", "semantic"])
    t.add_argument("--lists", nargs="+", default=["../shared/data/utkface/train_images.txt", "../shared/data/lfw/train_images.txt"], help="training image lists")
    t.add_argument("--work", default="runs/prior128", help="checkpoints, logs and the face cache")
    t.add_argument("--steps", type=int, help="training steps (default: prior 30000, gan 100000, entropy 3000, semantic 3000)")
    t.add_argument("--entropy-steps", type=int, help="semantic stage: steps of the refit of the upper layers' entropy models (default 3000)")
    t.add_argument("--minutes", type=float, help="stop (and checkpoint) after this many minutes; rerun to resume")
    t.add_argument("--batch-size", type=int, help="prior and gan stages: faces a step (default 8, sized for CPU; a GPU wants 32-64)")
    t.add_argument("--adv-weight", type=float, default=0.02, help="prior stage: weight of the adversarial term (0 turns the discriminator off)")
    t.add_argument("--id-weight", type=float, default=0.0,
                   help="prior stage: weight of the identity term (dlib descriptor distance, crop vs reconstruction); 0 turns it off")
    t.add_argument("--freeze-generator", action="store_true",
                   help="prior stage: train the encoder only (no adversarial term), against a frozen generator: the work folder's "
                        "prior checkpoint's if there is one, else the `gan` stage's")
    t.add_argument("--out", help="entropy and semantic stages: where to write the bundle (default, for the embedded model's own "
                                 "lineage only: codec/assets/facetier-prior-128.safetensors)")
    t.add_argument("--from-bundle", help="entropy and semantic stages: fit the layers on this bundle's prior as it is (e.g. one from "
                                         "`facetier import-prior`) instead of the work folder's trained prior; semantic default: the embedded model")
    t.add_argument("--init-from-bundle", help="prior stage: start the work folder from this bundle's generator (and encoder, if it has one); "
                                              "rerunning the same command resumes")
    t.add_argument("--codec-id", help="entropy and semantic stages: the codec id of the bundle written (default: from its prior)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="semantic stage: override a training setting, e.g. --set lambda_id=2500 (see SemanticTrainConfig)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)

    ip = sub.add_parser("import-prior", help="a facetier bundle from public StyleGAN2 (rosinality .pt) and pSp / e4e checkpoints")
    ip.add_argument("--stylegan", help="rosinality-format StyleGAN2 checkpoint (g_ema, latent_avg), e.g. stylegan2-ffhq-config-f.pt")
    ip.add_argument("--encoder", help="pSp or e4e checkpoint (state_dict with encoder./decoder., latent_avg, opts); its decoder is the "
                                      "generator when --stylegan is not given")
    ip.add_argument("--out", required=True, help="the bundle to write (.safetensors)")
    ip.add_argument("--codec-id", help="default: stylegan2-<size>, with -psp or -e4e when an encoder is given")
    ip.add_argument("--generator-license", default="", help="the generator's licence as you hold it (recorded; shown by `facetier info`)")
    ip.add_argument("--encoder-license", default="", help="the encoder's licence as you hold it")
    ip.add_argument("--new-encoder", choices=["psp", "compact"], default="psp",
                    help="without --encoder: the encoder `train prior --init-from-bundle` will train (pSp's IR-SE50, or facetier's narrow one)")
    ip.set_defaults(func=_import_prior)
