"""FROMAGe: a frozen causal LM grounded to images for interleaved inputs and outputs."""

from fromage.bank import ImageBank, RetrievedImage
from fromage.generation import Generation, generate
from fromage.model import FromageLosses, FromageModel
from fromage.tokens import RET_TOKEN, add_ret_token, tokenize_captions

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
