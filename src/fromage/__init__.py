"""FROMAGe: a frozen causal LM grounded to images for interleaved inputs and outputs.

The packages, bottom to top (each imports only from those before it):
``config``/``paths``/``metrics``/``reporting`` -> ``model`` (the method) -> ``data`` ->
``infer`` (generation, scoring, banks) -> ``eval`` (paper benchmarks) -> ``train``
(Lightning) -> ``bench`` and ``cli``.
"""

from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.infer.generation import Generation, GenerationConfig, generate
from fromage.infer.scoring import log_likelihood, retrieval_queries
from fromage.model.fromage import FromageModel
from fromage.model.load import load_model
from fromage.model.objectives import FromageLosses
from fromage.model.pretrained import save_pretrained
from fromage.model.tokens import RET_TOKEN

__all__ = [
    "RET_TOKEN",
    "FromageLosses",
    "FromageModel",
    "Generation",
    "GenerationConfig",
    "ImageBank",
    "RetrievedImage",
    "generate",
    "load_model",
    "log_likelihood",
    "retrieval_queries",
    "save_pretrained",
]
