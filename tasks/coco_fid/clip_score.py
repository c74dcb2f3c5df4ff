"""CLIP score of generated images against their captions, with open_clip from local weights (full tier).

The distillation papers report it beside COCO FID: DMD2 (tianweiy/DMD2 @ 8d8fa55, ``main/coco_eval/``)
scores its 30k COCO images with open_clip ``ViT-g-14`` (LAION-2B weights); SiD-LSG reports 0.304. The score
is the mean over images of the cosine similarity between the image embedding and its caption's text embedding
(Hessel et al., "CLIPScore", EMNLP 2021, without their 2.5 rescaling, as those tables print it: 0.30, not 30).
Images go through the model's own preprocessing (``create_model_and_transforms``), captions through its own
tokenizer (open_clip ships the BPE vocabulary, so nothing is downloaded). The weights are a local file
(``coco_fid.clip_weights``), loaded by open_clip with ``weights_only=True``; without one the score is not
computed and not declared.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench import BenchError

if TYPE_CHECKING:
    import numpy as np


def load(model_name: str, weights: str, device: str = "cpu"):
    try:
        import open_clip
    except ImportError:
        raise BenchError("the CLIP score needs open_clip: pip install open_clip_torch") from None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=weights, device=device)
    except (RuntimeError, OSError, ValueError) as exc:
        raise BenchError(f"cannot load open_clip {model_name!r} from {weights!r}: {exc}") from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def clip_score(images: np.ndarray, captions: list[str], model_name: str, weights: str, device: str = "cpu",
               batch_size: int = 64) -> float:
    """Mean cosine similarity of each uint8 [H, W, 3] image with its caption (see the module docstring)."""
    import torch
    from PIL import Image

    from bench import progress

    if len(images) != len(captions):
        raise BenchError(f"CLIP score: {len(images)} images for {len(captions)} captions")
    model, preprocess, tokenizer = load(model_name, weights, device)
    total = 0.0
    with progress.bar("CLIP score", len(images)) as update, torch.inference_mode():
        for start in range(0, len(images), batch_size):
            stop = min(len(images), start + batch_size)
            pixels = torch.stack([preprocess(Image.fromarray(im)) for im in images[start:stop]]).to(device)
            img = torch.nn.functional.normalize(model.encode_image(pixels).float(), dim=-1)
            txt = torch.nn.functional.normalize(model.encode_text(tokenizer(captions[start:stop]).to(device)).float(),
                                                dim=-1)
            total += float((img * txt).sum(-1).sum())
            update(stop)
    return total / len(images)
