"""Emu3 export: prompts-only records/s and peak memory as the input grows, and tokenized images/s.

Prompts and lists stream (memory flat in the input size); tokenization is bounded by the model.
The tokenizer here is the tiny random stand-in unless --tokenizer names a real one (and a GPU).

    python bench/bench_emu3.py [--records 100000 1000000] [--images 32] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import in_child  # noqa: E402

SIZES = [(1024, 1024), (1536, 1024), (1024, 1536), (2048, 1365)]


def make_file(path: Path, count: int, images: list[Path]) -> None:
    """`count` masked-stage records with 3 entities each, over a few real image files."""
    rng = random.Random(0)
    with open(path, "w") as out:
        for i in range(count):
            entities = [
                {"entity": f"thing {rng.randrange(500)}", "bbox": [0.1, 0.2, 0.4, 0.7]}
                for _ in range(3)
            ]
            record = {"image": str(images[i % len(images)]), "image_id": f"{i:09d}", "source": "s",
                      "caption": "a caption of some length " * 4, "entities": entities}  # fmt: skip
            out.write(json.dumps(record) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--images", type=int, default=32, help="images to tokenize")
    parser.add_argument("--tokenizer", help="Emu3 tokenizer folder (default: the random stand-in)")
    parser.add_argument("--area", type=int, default=720 * 720)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        images = []
        for i, (w, h) in enumerate(SIZES):
            images.append(tmp / f"{i}.jpg")
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images[-1])
        print(f"{'records':>10} {'step':<18} {'seconds':>8} {'records/s':>11} {'peak MiB':>9}")
        for count in args.records:
            path = tmp / f"{count}.jsonl"
            make_file(path, count, images)
            code = (
                "from groundset.exports.emu3 import Emu3Settings, export_emu3; "
                f"export_emu3({str(path)!r}, {str(tmp / 'prompts')!r}, "
                "Emu3Settings.from_config({'tokenize': False}))"
            )
            r = in_child(code)
            print(f"{count:>10,} {'prompts only':<18} {r['seconds']:>8.2f} {count / r['seconds']:>11,.0f} "
                  f"{r['peak_rss_mb']:>9.0f}", flush=True)  # fmt: skip
            path.unlink()
        path = tmp / "images.jsonl"
        make_file(path, args.images, images)
        tokenizer = repr(args.tokenizer)
        code = (
            "from groundset.exports.emu3 import Emu3Settings, export_emu3, load_tokenizer; "
            f"s = Emu3Settings.from_config({{'tokenizer': {tokenizer}, 'image_area': {args.area}, "
            "'batch_size': 8}); "
            "tok = load_tokenizer(s); "
            f"export_emu3({str(path)!r}, {str(tmp / 'tokens')!r}, s, lambda: tok)"
        )
        r = in_child(code)
        device = "stand-in" if args.tokenizer is None else args.tokenizer
        print(f"{args.images:>10,} {'tokenized':<18} {r['seconds']:>8.2f} {args.images / r['seconds']:>11,.1f} "
              f"{r['peak_rss_mb']:>9.0f}  ({device}, area {args.area}, incl. model load)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
