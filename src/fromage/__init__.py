"""FROMAGe: a frozen causal LM grounded to images for interleaved inputs and outputs."""

from fromage.infer.bank import ImageBank, RetrievedImage
from fromage.infer.generation import Generation, generate
from fromage.model.fromage import FromageLosses, FromageModel
from fromage.model.tokens import RET_TOKEN, add_ret_token, tokenize_captions

__all__ = [
    "RET_TOKEN",
    "FromageLosses",
    "FromageModel",
    "Generation",
    "ImageBank",
    "RetrievedImage",
    "add_ret_token",
    "generate",
    "tokenize_captions",
]
