"""CLIP's own text-to-image retrieval: the comparison rows of the paper's Table 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoConfig, AutoTokenizer, CLIPImageProcessor, CLIPModel

from fromage.config import HF_BACKENDS, VisionConfig
from fromage.model.backbones import freeze, torch_dtype


class CLIPBaseline:
    """A full CLIP model (text and image towers with their projections); an ``ImageEmbedder``."""

    def __init__(self, name: str, dtype: str = "float32", device: str | torch.device = "cpu"):
        self.model = freeze(CLIPModel.from_pretrained(name, dtype=torch_dtype(dtype)).to(device))
        self.processor = CLIPImageProcessor.from_pretrained(name)
        self.tokenizer = AutoTokenizer.from_pretrained(name)
        self.fingerprint = f"clip:{name}"
        self.device = torch.device(device)

    @staticmethod
    def available_for(vision: VisionConfig) -> bool:
        """Whether the vision tower is the image half of a full CLIP checkpoint."""
        return (
            vision.backend in HF_BACKENDS
            and AutoConfig.from_pretrained(vision.name).model_type == "clip"
        )

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor(images=image.convert("RGB"), return_tensors="pt").pixel_values[0]

    @torch.no_grad()
    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, self.model.dtype)
        return F.normalize(
            self.model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1
        )

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """Normalised text embeddings; texts longer than CLIP's context are truncated."""
        tokens = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.model.config.text_config.max_position_embeddings,
            return_tensors="pt",
        ).to(self.device)
        return F.normalize(self.model.get_text_features(**tokens).pooler_output.float(), dim=-1)
