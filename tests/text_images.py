"""Image-like test inputs for OCR models, made here (no dataset is downloaded): lines of random
letters and digits in Pillow's built-in font, dark on a light paper-coloured background with a
little noise — what a text detector or direction classifier sees, where uniform noise gives a text
detector's probability map of ~0 everywhere and an INT8-vs-float cosine that means nothing.

    text_images(n, height, width, seed) -> float32 [n, 3, height, width] in [-1, 1]

normalised as RapidOCR feeds PP-OCR models ((pixel / 255 - 0.5) / 0.5)."""

from __future__ import annotations

import numpy as np

ALPHABET = list("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 .,:-")


def text_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    out = np.empty((n, 3, height, width), np.float32)
    for k in range(n):
        img = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(170, 256, 3)))
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(4, 12))):
            size = int(rng.integers(max(8, height // 16), max(12, height // 8)))
            text = "".join(rng.choice(ALPHABET, int(rng.integers(3, 14))))
            at = (int(rng.integers(0, max(1, width - 2 * size))), int(rng.integers(0, max(1, height - size))))
            draw.text(at, text, fill=tuple(int(v) for v in rng.integers(0, 90, 3)),
                      font=ImageFont.load_default(size=size))
        pixels = np.asarray(img, np.float32) / 255.0 + rng.normal(0.0, 0.02, (height, width, 3)).astype(np.float32)
        out[k] = ((pixels - 0.5) / 0.5).transpose(2, 0, 1)
    return np.clip(out, -1.0, 1.0)
