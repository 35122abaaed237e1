"""Tiny, randomly initialised stand-ins for the filter models, for tests and the offline sample.

They are the same classes data-juicer loads (ViTForImageClassification + ViTImageProcessor for
NSFW and watermark, AestheticsPredictorV2Linear + CLIPProcessor for aesthetics), saved with
`save_pretrained`, so the real loading and scoring code runs. Their scores mean nothing; the
classifier biases are set so that scores land near the default thresholds and both sides of
every threshold are exercised. Never use them for real data.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from groundset.core.io import plain_mode_tree

log = logging.getLogger(__name__)

# Directory names: data-juicer picks the aesthetics class from substrings of the path ("v2", "linear").
NAMES = {
    "nsfw": "stand-in-nsfw-vit",
    "watermark": "stand-in-watermark-vit",
    "aesthetics": "stand-in-aesthetics-predictor-v2-linear",
}
# Bias of the positive class (NSFW, watermark) and of the aesthetics head (raw LAION 0-10), and
# a gain on the last layer's weights so scores spread over both sides of the default thresholds.
BIASES = {"nsfw": -9.8, "watermark": 0.3, "aesthetics": 5.5}
GAINS = {"nsfw": 25.0, "watermark": 25.0, "aesthetics": 150.0}
# The one tiny transformer shape both stand-in families use (32 px input, 2 layers).
TINY = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
# Benchmarks only (bench/bench_filter.py --models real-size): the real models' architectures with
# random weights — ViT-B/16 at 224 px (NSFW, watermark) and CLIP ViT-L/14 at 224 px with the
# LAION linear head (aesthetics) — so compute costs are the real ones.
VIT_B16 = {
    "image_size": 224,
    "patch_size": 16,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}
CLIP_L14 = {
    "image_size": 224,
    "patch_size": 14,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "projection_dim": 768,
}
SHAPES = {"tiny": (TINY, {**TINY, "projection_dim": 16}), "real-size": (VIT_B16, CLIP_L14)}


def _vit_classifier(
    path: Path, positive_bias: float, gain: float, seed: int, shape: dict = TINY
) -> None:
    """A 2-class ViT (`shape`) whose positive-class logit is shifted by `positive_bias`."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(seed)
    config = ViTConfig(
        **shape,
        num_labels=2,
        id2label={0: "normal", 1: "positive"},
        label2id={"normal": 0, "positive": 1},
    )
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(gain)
        model.classifier.bias.copy_(torch.tensor([0.0, positive_bias]))
    model.save_pretrained(path)
    side = shape["image_size"]
    ViTImageProcessor(size={"height": side, "width": side}).save_pretrained(path)


def _byte_level_vocab() -> dict[str, int]:
    """A minimal CLIP byte-level vocabulary (every byte, alone and word-final, plus specials)."""
    chars = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    chars += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in chars]
    symbols = [chr(c) for c in chars] + [chr(256 + i) for i in range(len(extra))]
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}


def _aesthetics(
    path: Path, bias: float, gain: float, seed: int, shape: dict = SHAPES["tiny"][1]
) -> None:
    """An AestheticsPredictorV2Linear on a CLIP vision tower (`shape`), with a CLIPProcessor."""
    import torch
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip.configuration_clip import CLIPVisionConfig

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**shape)
    model = AestheticsPredictorV2Linear(config).eval()
    with torch.no_grad():
        model.layers[-1].weight.mul_(gain)
        model.layers[-1].bias.fill_(bias)
    model.save_pretrained(path)
    vocab, merges = path / "vocab.json", path / "merges.txt"
    vocab.write_text(json.dumps(_byte_level_vocab()))
    merges.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(vocab), str(merges))
    side = shape["image_size"]
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def build_stand_in_models(
    root: str | os.PathLike, seed: int = 0, size: str = "tiny"
) -> dict[str, str]:
    """Create the three stand-in models under `root` (once); return filter name -> model path.

    `size="real-size"` builds the real architectures (random weights) for benchmarks."""
    root = Path(root).resolve()
    vit, clip = SHAPES[size]
    paths = {name: root / dirname for name, dirname in NAMES.items()}
    builders = {
        "nsfw": lambda p: _vit_classifier(p, BIASES["nsfw"], GAINS["nsfw"], seed, vit),
        "watermark": lambda p: _vit_classifier(
            p, BIASES["watermark"], GAINS["watermark"], seed + 1, vit
        ),
        "aesthetics": lambda p: _aesthetics(
            p, BIASES["aesthetics"], GAINS["aesthetics"], seed + 2, clip
        ),
    }
    for name, path in paths.items():
        if not (path / "config.json").exists():
            builders[name](path)
            plain_mode_tree(path)  # safetensors writes 0600: readable as the umask allows
            log.warning(
                "built a RANDOM stand-in %s model at %s: scores are meaningless", name, path
            )
    return {name: str(path) for name, path in paths.items()}
