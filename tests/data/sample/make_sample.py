"""Regenerate the bundled sample (needs scikit-image; the output is committed, so users never run this).

Writes `www/img/*` (served on loopback during the sample's download) and two URL lists in
LAION's parquet schemas. Real photos come from scikit-image's public-domain data, as they
are and upscaled past 1024 px, so that every later filter has real content on both sides of
its threshold; generated images add boundary sizes/aspects and odd encodings; a few URLs are
broken on purpose. Run: `python tests/data/sample/make_sample.py`.
"""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
WWW = HERE / "www" / "img"
HOST = "http://sample.groundset.invalid/img/"
QUALITY = 80


def photo(name: str) -> Image.Image:
    """A scikit-image sample photo as an RGB PIL image."""
    return Image.fromarray(getattr(data, name)()).convert("RGB")


def upscale(img: Image.Image, short_side: int) -> Image.Image:
    """Resize so that the shorter side is `short_side`, aspect kept."""
    scale = short_side / min(img.size)
    return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)


def crop_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """Upscale to cover (width, height), then centre-crop to exactly that size."""
    scale = max(width / img.width, height / img.height)
    big = img.resize((round(img.width * scale) + 1, round(img.height * scale) + 1), Image.LANCZOS)
    left, top = (big.width - width) // 2, (big.height - height) // 2
    return big.crop((left, top, left + width, top + height))


def gradient(width: int, height: int, seed: int) -> Image.Image:
    """A smooth synthetic RGB image (compresses well) with a few shapes."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0, 1, size=(3, 3))
    rgb = np.stack([c[i, 0] * x / width + c[i, 1] * y / height + c[i, 2] for i in range(3)], -1)
    img = Image.fromarray((np.clip(rgb / rgb.max(), 0, 1) * 255).astype(np.uint8))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        size = int(min(width, height) * rng.uniform(0.1, 0.3))
        draw.ellipse(
            (x0, y0, x0 + size, y0 + size), fill=tuple(int(v) for v in rng.integers(0, 255, 3))
        )
    return img


def save(img: Image.Image, name: str, **kwargs) -> tuple[int, int]:
    """Save an image under www/img and return its size."""
    img.save(WWW / name, **kwargs)
    return img.size


def build_images() -> list[dict]:
    """Write every sample file; return one row stub per URL (name, size, alt text, metadata policy)."""
    WWW.mkdir(parents=True, exist_ok=True)
    rows = []

    def add(name, size, text, source, meta_size=True):
        rows.append(
            {"name": name, "size": size, "text": text, "source": source, "meta_size": meta_size}
        )

    hr, aes = "hr", "aes"
    # Real photos as they are (all under 1024 px): half carry WIDTH/HEIGHT (dropped before
    # download), half have no size metadata (downloaded, then dropped by the shape filter).
    add(
        "astronaut.jpg",
        save(photo("astronaut"), "astronaut.jpg", quality=QUALITY),
        "astronaut in a space suit with the american flag",
        hr,
    )
    add(
        "chelsea.jpg",
        save(photo("chelsea"), "chelsea.jpg", quality=QUALITY),
        "tabby cat chelsea looking at the camera",
        hr,
        meta_size=False,
    )
    add(
        "coffee.jpg",
        save(photo("coffee"), "coffee.jpg", quality=QUALITY),
        "cup of coffee on a saucer",
        aes,
    )
    add(
        "rocket.jpg",
        save(photo("rocket"), "rocket.jpg", quality=QUALITY),
        "rocket on the launch pad",
        aes,
        meta_size=False,
    )
    add(
        "hubble.jpg",
        save(photo("hubble_deep_field"), "hubble.jpg", quality=QUALITY),
        "hubble deep field galaxies",
        hr,
        meta_size=False,
    )
    add(
        "ihc.jpg",
        save(photo("immunohistochemistry"), "ihc.jpg", quality=QUALITY),
        "immunohistochemistry stained tissue",
        aes,
    )
    # The same photos upscaled past 1024 px, aspect kept (0.67 to 1.5).
    add(
        "astronaut_1024.jpg",
        save(upscale(photo("astronaut"), 1024), "astronaut_1024.jpg", quality=QUALITY),
        "astronaut portrait high resolution",
        hr,
    )
    add(
        "chelsea_1536x1024.jpg",
        save(upscale(photo("chelsea"), 1024), "chelsea_1536x1024.jpg", quality=QUALITY),
        "cat with green eyes close up",
        hr,
    )
    add(
        "coffee_1536x1024.jpg",
        save(upscale(photo("coffee"), 1024), "coffee_1536x1024.jpg", quality=QUALITY),
        "coffee cup with latte art on a table",
        aes,
    )
    add(
        "rocket_1535x1024.jpg",
        save(upscale(photo("rocket"), 1024), "rocket_1535x1024.jpg", quality=QUALITY),
        "space shuttle before launch",
        hr,
    )
    add(
        "hubble_1174x1024.jpg",
        save(upscale(photo("hubble_deep_field"), 1024), "hubble_1174x1024.jpg", quality=QUALITY),
        "deep space galaxies wallpaper",
        aes,
    )
    add(
        "ihc_1100.jpg",
        save(upscale(photo("immunohistochemistry"), 1100), "ihc_1100.jpg", quality=QUALITY),
        "microscope image of cells",
        hr,
    )
    add(
        "retina.jpg",
        save(photo("retina"), "retina.jpg", quality=QUALITY),
        "retina fundus photograph",
        aes,
    )
    # Real content at the wrong aspect ratio (wider than 2:1, taller than 1:2).
    add(
        "coffee_wide_2200x1024.jpg",
        save(crop_to(photo("coffee"), 2200, 1024), "coffee_wide_2200x1024.jpg", quality=QUALITY),
        "panorama of a coffee table",
        hr,
    )
    add(
        "rocket_tall_1024x2100.jpg",
        save(crop_to(photo("rocket"), 1024, 2100), "rocket_tall_1024x2100.jpg", quality=QUALITY),
        "tall poster of a rocket",
        aes,
        meta_size=False,
    )
    # Generated images at the boundaries of the shape and aspect filters.
    add(
        "gen_2048x1024.jpg",
        save(gradient(2048, 1024, 1), "gen_2048x1024.jpg", quality=QUALITY),
        "abstract wide banner",
        hr,
    )
    add(
        "gen_1024x2048.jpg",
        save(gradient(1024, 2048, 2), "gen_1024x2048.jpg", quality=QUALITY),
        "abstract tall banner",
        hr,
    )
    add(
        "gen_1023x1023.jpg",
        save(gradient(1023, 1023, 3), "gen_1023x1023.jpg", quality=QUALITY),
        "abstract square just too small",
        hr,
        meta_size=False,
    )
    add(
        "gen_1024x1024.jpg",
        save(gradient(1024, 1024, 4), "gen_1024x1024.jpg", quality=QUALITY),
        "abstract square",
        aes,
    )
    add(
        "gen_1280x720.jpg",
        save(gradient(1280, 720, 5), "gen_1280x720.jpg", quality=QUALITY),
        "abstract landscape hd",
        hr,
    )
    add(
        "gen_3000x2000.jpg",
        save(gradient(3000, 2000, 6), "gen_3000x2000.jpg", quality=QUALITY),
        "abstract large photo",
        aes,
    )
    # Other encodings: PNG with alpha, palette PNG, 16-bit PNG, WEBP, grayscale and CMYK JPEG, animated GIF.
    add(
        "gen_rgba_1200.png",
        save(gradient(1200, 1200, 7).convert("RGBA"), "gen_rgba_1200.png"),
        "logo with transparency",
        hr,
    )
    add(
        "gen_palette_1100.png",
        save(gradient(1100, 1100, 8).convert("P", palette=Image.ADAPTIVE), "gen_palette_1100.png"),
        "flat colour illustration",
        aes,
    )
    sixteen = np.asarray(gradient(1024, 1024, 9).convert("L"), dtype=np.uint16) * 257
    add(
        "gen_16bit_1024.png",
        save(Image.fromarray(sixteen), "gen_16bit_1024.png"),
        "sixteen bit grayscale scan",
        hr,
    )
    add(
        "gen_1280x1024.webp",
        save(gradient(1280, 1024, 10), "gen_1280x1024.webp", quality=QUALITY),
        "webp image",
        aes,
    )
    add(
        "gen_gray_1100.jpg",
        save(gradient(1100, 1100, 11).convert("L"), "gen_gray_1100.jpg", quality=QUALITY),
        "black and white photo",
        hr,
    )
    add(
        "gen_cmyk_1200x1024.jpg",
        save(gradient(1200, 1024, 12).convert("CMYK"), "gen_cmyk_1200x1024.jpg", quality=QUALITY),
        "print ready cmyk image",
        aes,
    )
    frames = [gradient(1024, 1024, 20 + i).convert("P", palette=Image.ADAPTIVE) for i in range(3)]
    frames[0].save(
        WWW / "gen_animated_1024.gif", save_all=True, append_images=frames[1:], duration=200, loop=0
    )
    add("gen_animated_1024.gif", (1024, 1024), "animated gif", hr)
    # Broken on purpose: a text file named .jpg, a truncated JPEG, an empty file, a missing file, an unknown host.
    (WWW / "not_an_image.jpg").write_text("<html><body>this is not an image</body></html>\n")
    add("not_an_image.jpg", (1500, 1200), "html page instead of an image", hr)
    buf = io.BytesIO()
    gradient(1300, 1100, 13).save(buf, "JPEG", quality=QUALITY)
    (WWW / "truncated_1300x1100.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    add("truncated_1300x1100.jpg", (1300, 1100), "truncated download", aes)
    (WWW / "empty.jpg").write_bytes(b"")
    add("empty.jpg", (1200, 1200), "empty file", hr)
    add("missing.jpg", (1600, 1200), "image that was deleted from the server", hr)
    add("@unknown-host", (1200, 1200), "image on a host that does not answer", aes)
    # Duplicates, which the dedup stage keeps from being captioned twice: the same bytes under
    # another URL, the same URL in both lists, and a re-encode of a kept image (5% larger, JPEG
    # quality 60: its perceptual hash is 2 bits from the original's).
    (WWW / "coffee_copy.jpg").write_bytes((WWW / "coffee_1536x1024.jpg").read_bytes())
    add("coffee_copy.jpg", (1536, 1024), "latte art coffee cup (the same file again)", aes)
    add("gen_animated_1024.gif", (1024, 1024), "animated gif (the same URL in both lists)", aes)
    cmyk = Image.open(WWW / "gen_cmyk_1200x1024.jpg")
    add(
        "gen_cmyk_reencoded.jpg",
        save(cmyk.resize((1260, 1075), Image.LANCZOS), "gen_cmyk_reencoded.jpg", quality=60),
        "print ready cmyk image (re-encoded)",
        aes,
    )
    return rows


def url_lists(rows: list[dict]) -> None:
    """Write the two URL lists in LAION's laion-high-resolution and aesthetics_v2_4.75 schemas."""
    rng = random.Random(1234)
    for source, filename, extra in (
        ("hr", "laion-high-resolution.parquet", "LANGUAGE"),
        ("aes", "laion-aesthetics_v2_4.75.parquet", "AESTHETIC_SCORE"),
    ):
        records = []
        for row in (r for r in rows if r["source"] == source):
            url = (
                "http://unreachable.groundset.invalid/photo.jpg"
                if row["name"].startswith("@")
                else HOST + row["name"]
            )
            width, height = row["size"] if row["meta_size"] else (None, None)
            record = {
                "URL": url,
                "TEXT": row["text"],
                "WIDTH": width,
                "HEIGHT": height,
                "similarity": round(rng.uniform(0.25, 0.4), 4),
                "hash": rng.randrange(-(2**63), 2**63),
                "punsafe": round(rng.uniform(0.0, 0.002), 6),
                "pwatermark": round(rng.uniform(0.0, 1.0), 4),
            }
            record[extra] = "en" if extra == "LANGUAGE" else round(rng.uniform(4.75, 7.0), 4)
            records.append(record)
        frame = pd.DataFrame.from_records(records)
        frame["WIDTH"] = frame["WIDTH"].astype("Int64")
        frame["HEIGHT"] = frame["HEIGHT"].astype("Int64")
        frame.to_parquet(HERE / filename, index=False)
        print(f"{filename}: {len(frame)} rows")


if __name__ == "__main__":
    url_lists(build_images())
