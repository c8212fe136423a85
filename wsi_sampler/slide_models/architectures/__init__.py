"""Slide model architectures by card name, built from the card's ``architecture_kwargs``.

Each entry says which constructor argument is the patch embedding size and which is the
class count, so a card may leave them out (they follow from ``patch_encoder`` and
``class_names``) and a card that states them is checked against both.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from ...errors import ModelLoadError
from ._blocks import SlideOutput
from .abmil import ABMIL
from .chief import Chief
from .clam import ClamMB, ClamSB, MilFC
from .heads import LinearHead, MLPHead, OverSlideEncoder
from .madeleine import Madeleine
from .mean import MeanPool
from .transmil import TransMIL
from .trident import TridentABMIL

__all__ = ["ARCHITECTURES", "Architecture", "OverSlideEncoder", "SlideOutput",
           "build_architecture"]


@dataclass(frozen=True)
class Architecture:
    cls: type[nn.Module]
    in_dim_arg: str
    classes_arg: str
    original: str
    """The training code's class, for messages and docs."""
    single_logit: bool = False
    """The default is one logit (a sigmoid over two classes)."""
    encoder: bool = False
    """Built with no classes, it is a slide encoder (its answer is the embedding)."""
    pretraining_classes: bool = False
    """A slide encoder that keeps its pretraining classifier (its checkpoint has one): a card
    without class names gives the class count, and the answer is the embedding."""


ARCHITECTURES: dict[str, Architecture] = {
    "clam_sb": Architecture(ClamSB, "embed_dim", "n_classes", "CLAM models.model_clam.CLAM_SB"),
    "clam_mb": Architecture(ClamMB, "embed_dim", "n_classes", "CLAM models.model_clam.CLAM_MB"),
    "mil_fc": Architecture(MilFC, "embed_dim", "n_classes",
                           "CLAM models.model_mil.MIL_fc / MIL_fc_mc"),
    "abmil": Architecture(ABMIL, "in_dim", "num_classes", "MIL-Lab src.models.abmil.ABMIL",
                          encoder=True),
    "trident_abmil": Architecture(TridentABMIL, "input_feature_dim", "n_classes",
                                  "TRIDENT ABMILSlideEncoder + tutorial classifier",
                                  single_logit=True),
    "transmil": Architecture(TransMIL, "in_dim", "n_classes", "TransMIL models.TransMIL"),
    "chief": Architecture(Chief, "embed_dim", "n_classes", "CHIEF models.CHIEF.CHIEF",
                          encoder=True, pretraining_classes=True),
    "madeleine": Architecture(Madeleine, "patch_embedding_dim", "n_classes",
                              "MADELEINE madeleine.models.Model.MADELEINE (H&E)",
                              encoder=True),
    "mean": Architecture(MeanPool, "in_dim", "n_classes", "mean pooling + linear",
                         encoder=True),
    "linear": Architecture(LinearHead, "in_dim", "n_classes",
                           "linear probe on a slide embedding (torch.nn.Linear)"),
    "mlp": Architecture(MLPHead, "in_dim", "n_classes",
                        "MLP on a slide embedding (Linear, ReLU, Dropout, Linear)"),
}


def _n_logits(arch: Architecture, kwargs: dict[str, Any], class_names: tuple[str, ...]
              ) -> int:
    """The class count argument: as given, else one per class (one for a single-logit
    default over two classes)."""
    if arch.classes_arg in kwargs:
        n = kwargs[arch.classes_arg]
        if not isinstance(n, int) or isinstance(n, bool):
            raise ModelLoadError(f"{arch.classes_arg} must be an integer, got {n!r}")
        return n
    return 1 if arch.single_logit and len(class_names) == 2 else len(class_names)


def build_architecture(name: str, kwargs: dict[str, Any], *, in_dim: int,
                       class_names: tuple[str, ...]) -> nn.Module:
    """The module of architecture ``name`` (random weights), its embedding size and class
    count filled in or checked."""
    arch = ARCHITECTURES.get(name)
    if arch is None:
        raise ModelLoadError(f"unknown slide architecture {name!r} ({', '.join(ARCHITECTURES)})")
    accepted = set(inspect.signature(arch.cls.__init__).parameters) - {"self", "unused"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ModelLoadError(f"{name} ({arch.original}) takes no argument {unknown[0]!r}; "
                             f"its arguments: {', '.join(sorted(accepted))}")
    given_dim = kwargs.get(arch.in_dim_arg, in_dim)
    if given_dim != in_dim:
        raise ModelLoadError(f"architecture_kwargs.{arch.in_dim_arg} is {given_dim} but the "
                             f"embeddings it reads are {in_dim}-d")
    n_logits = _n_logits(arch, kwargs, class_names)
    if not class_names and not arch.encoder:
        raise ModelLoadError(f"{name} needs class_names (only abmil, mean, chief and "
                             "madeleine are slide encoders without classes)")
    encoding = arch.pretraining_classes and not class_names
    if n_logits != len(class_names) and not (n_logits == 1 and len(class_names) == 2) and (
            not encoding):
        raise ModelLoadError(
            f"architecture_kwargs.{arch.classes_arg} is {n_logits} but the card names "
            f"{len(class_names)} classes ({', '.join(class_names)})")
    full = dict(kwargs) | {arch.in_dim_arg: in_dim, arch.classes_arg: n_logits}
    try:
        return arch.cls(**full)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"cannot build {name} from {full}: {exc}") from exc
