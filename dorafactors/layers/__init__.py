"""The PEFT-facing DoRA layer classes and the Linear DoRA variant (subclasses of PEFT's originals); they
delegate the maths."""

from .conv import DoraConv1dLayer, DoraConv2dLayer, DoraConv3dLayer
from .embedding import DoraEmbeddingLayer
from .linear import DoraLinearLayer, DoraLinearVariant

__all__ = [
    "DoraConv1dLayer",
    "DoraConv2dLayer",
    "DoraConv3dLayer",
    "DoraEmbeddingLayer",
    "DoraLinearLayer",
    "DoraLinearVariant",
]
