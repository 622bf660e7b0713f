"""FROMAGe: a frozen causal LM grounded to images for interleaved inputs and outputs.

The packages, bottom to top (each imports only from those before it):
``config``/``paths``/``ranks``/``metrics``/``reporting`` -> ``model`` (the method) -> ``data`` ->
``infer`` (generation, scoring, banks) -> ``eval`` (paper benchmarks) -> ``train``
(Lightning) -> ``bench`` and ``cli``.

The names below are imported from their modules on first use, so that importing one
part of the package (``fromage.infer.bank`` in a process that only searches a bank)
does not load every layer, transformers included.
"""

from importlib import import_module

_HOMES = {
    "RET_TOKEN": "fromage.model.tokens",
    "FromageLosses": "fromage.model.objectives",
    "FromageModel": "fromage.model.fromage",
    "Generation": "fromage.infer.generation",
    "GenerationConfig": "fromage.infer.generation",
    "ImageBank": "fromage.infer.bank",
    "RetrievedImage": "fromage.infer.bank",
    "generate": "fromage.infer.generation",
    "load_model": "fromage.model.load",
    "log_likelihood": "fromage.infer.scoring",
    "retrieval_queries": "fromage.infer.scoring",
    "save_pretrained": "fromage.model.pretrained",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'fromage' has no attribute {name!r}")
    value = getattr(import_module(_HOMES[name]), name)
    globals()[name] = value  # found directly next time
    return value


def __dir__() -> list[str]:
    return __all__
