"""Draw the module icon, Resources/Icons/SemiSeg.png (128 x 128): a slice with a half-filled segment outline.

Run: ``python Resources/Icons/make_icon.py``. Needs Pillow only.
"""
from pathlib import Path

from PIL import Image, ImageDraw


def draw() -> Image.Image:
    img = Image.new("RGBA", (128, 128), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((4, 4, 123, 123), radius=18, fill=(36, 52, 71, 255))
    d.ellipse((24, 28, 104, 100), fill=(120, 132, 146, 255))           # the organ in a grey slice
    d.pieslice((24, 28, 104, 100), 90, 270, fill=(241, 160, 40, 255))  # labelled half (a person's label)
    d.ellipse((24, 28, 104, 100), outline=(90, 200, 250, 255), width=5)  # the pseudo-label outline
    d.ellipse((74, 52, 86, 64), fill=(80, 220, 120, 255))                # a positive prompt point
    return img


if __name__ == "__main__":
    out = Path(__file__).resolve().parent / "SemiSeg.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw().save(out)
    print(out)
