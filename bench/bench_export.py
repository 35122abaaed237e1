"""COCO, ODVG and WebDataset exports: records/s and peak memory as the input grows, and the
WebDataset writer against `tar -cf` over the same image files.

The exports stream (memory flat in the input size: compare the peak at each size). Records have
3 entities over a few hundred small JPEG files, half with masks as RLE in the record and half
naming one of a few hundred `.npy` files (--mask-format changes that). The tar baseline archives
each record's files once per record (its image, and its `.npy` masks when it names them:
the files its sample is made from; `tar --hard-dereference -P -cf OUT -T LIST`, names repeated,
every copy stored in full), then `sync OUT`, as the export fsyncs each shard before
renaming it; the WebDataset export writes that and a json per record (target: at most 2x
tar's time). The peak RSS is the whole child interpreter's (numpy, PIL,
pycocotools loaded), worker processes not included.

    python bench/bench_export.py [--records 10000 100000] [--images 300] [--image-side 64]
                                 [--mask-format mixed] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import best_of, in_child, timed_shell  # noqa: E402

ASPECTS = [(4, 3), (3, 4), (1, 1)]
NAMES = ["dog", "cat", "tree", "big red car", "person", "mountain", "sky", "house"]


def make_inputs(tmp: Path, images: int, side: int) -> list[dict]:
    """`images` JPEG files (longest side `side`) with 3 masks each, as an .npy file and as RLE."""
    from groundset.stages.mask import encode_rle

    rng = np.random.default_rng(0)
    (tmp / "img").mkdir()
    (tmp / "masks").mkdir()
    made = []
    for i in range(images):
        aw, ah = ASPECTS[i % len(ASPECTS)]
        w, h = side * aw // max(aw, ah), side * ah // max(aw, ah)
        path = tmp / "img" / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, quality=80)
        masks = np.zeros((3, h, w), dtype=bool)
        for k in range(3):
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            masks[k, y : y + h // 3, x : x + w // 3] = True
        npy = tmp / "masks" / f"{i:05d}.npy"
        np.save(npy, masks)
        made.append({"image": str(path), "npy": str(npy), "rle": encode_rle(masks), "size": (h, w)})
    return made


def make_file(path: Path, count: int, inputs: list[dict], mask_format: str) -> Path:
    """`count` masked records over the inputs; returns the list of the files each record's sample
    is made from (its image, and its .npy masks if it names them), for tar."""
    rng = random.Random(0)
    listing = path.with_suffix(".list")
    with open(path, "w") as out, open(listing, "w") as files:
        for i in range(count):
            made = inputs[i % len(inputs)]
            h, w = made["size"]
            names = rng.sample(NAMES, 3)
            entities = [{"entity": n, "bbox": [0.1, 0.2, 0.6, 0.7]} for n in names]
            record = {
                "image": made["image"], "image_id": f"{i:09d}", "url": f"http://x.org/{i}.jpg",
                "source": "laion-aesthetics_v2_4.75", "text": "alt text",
                "caption": f"A {names[0]} next to a {names[1]} in the evening light.",
                "entities": entities, "mask_scores": [0.91, 0.82, 0.73],
                "mask_shape": [3, h, w], "meta": {"similarity": 0.31, "punsafe": 0.001},
            }  # fmt: skip
            use_rle = mask_format == "rle" or (mask_format == "mixed" and i % 2)
            if use_rle:
                record.update(mask_file=None, mask_rle=made["rle"], mask_format="rle")
            else:
                record["mask_file"] = made["npy"]
                files.write(made["npy"] + "\n")  # the sample's masks come from this file
            out.write(json.dumps(record) + "\n")
            files.write(made["image"] + "\n")
    return listing


def run_export(kind: str, source: Path, target: Path, workers: int) -> dict:
    """Seconds (imports excluded), peak RSS and stats of one export in a fresh interpreter."""
    report = target.with_name(target.name + ".report.json")
    call = {
        "coco": f"e.export_coco({str(source)!r}, {str(target)!r}, workers={workers})",
        "odvg": f"e.export_odvg({str(source)!r}, {str(target)!r})",
        "wds": f"e.export_wds({str(source)!r}, {str(target)!r}, workers={workers})",
    }[kind]
    code = (
        f"import json, time, logging; import groundset.exports.{kind} as e; "
        "logging.disable(logging.INFO); t = time.perf_counter(); "
        f"s = {call}; "
        f"json.dump({{'seconds': time.perf_counter() - t, 'stats': s}}, open({str(report)!r}, 'w'))"
    )
    child = in_child(code)
    result = json.loads(report.read_text())
    return {**result, "peak_rss_mb": child["peak_rss_mb"]}


def main() -> int:
    """Make the inputs, run each export at each size, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--images", type=int, default=300, help="distinct image files")
    parser.add_argument("--image-side", type=int, default=64, help="longest image side (px)")
    parser.add_argument("--mask-format", choices=["rle", "npy", "mixed"], default="mixed")
    parser.add_argument("--workers", type=int, default=1, help="coco and wds worker processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inputs = make_inputs(tmp, args.images, args.image_side)
        print(f"{'records':>10} {'export':<8} {'seconds':>8} {'records/s':>11} {'peak MiB':>9}  "
              "notes")  # fmt: skip
        for count in args.records:
            path = tmp / f"{count}.jsonl"
            listing = make_file(path, count, inputs, args.mask_format)
            for kind, target in (("coco", tmp / "coco.json"), ("odvg", tmp / "odvg.jsonl"),
                                 ("wds", tmp / "wds")):  # fmt: skip
                r = run_export(kind, path, target, args.workers)
                note = ""
                if kind == "wds":
                    tar = tmp / "baseline.tar"
                    # synced, as each shard of the export is (durable before it is renamed)
                    tar_s = best_of(2, lambda t=tar, f=listing: timed_shell(
                        f"tar --hard-dereference -P -cf {t} -T {f} && sync {t}"))  # fmt: skip
                    tar_mb = tar.stat().st_size / 2**20
                    wds_mb = r["stats"]["bytes"] / 2**20
                    shards, ratio = r["stats"]["shards"], r["seconds"] / tar_s
                    note = (f"tar -cf + sync {tar_s:.2f} s ({tar_mb:.0f} MiB), wds {wds_mb:.0f} MiB in "
                            f"{shards} shards: {ratio:.2f}x tar")  # fmt: skip
                    tar.unlink()
                    shutil.rmtree(target)
                else:
                    target.unlink()
                print(f"{count:>10,} {kind:<8} {r['seconds']:>8.2f} {count / r['seconds']:>11,.0f} "
                      f"{r['peak_rss_mb']:>9.0f}  {note}", flush=True)  # fmt: skip
            path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
