"""A horizontal bar chart drawn with PIL (no matplotlib): one bar per (label, value, unit) row."""

from PIL import Image, ImageDraw, ImageFont

WIDTH = 960
ROW = 34
LABEL_W = 300
COLORS = [(46, 125, 50), (21, 101, 192), (239, 108, 0), (106, 27, 154), (0, 131, 143), (158, 157, 36)]


def bar_chart(title: str, rows: list[tuple[str, float, str]]) -> Image.Image:
    """An RGB image: TITLE, then one bar per row scaled to the largest value, with the value written after it."""
    font = ImageFont.load_default()
    height = 60 + ROW * len(rows) + 20
    image = Image.new("RGB", (WIDTH, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((12, 14), title[:150], fill="black", font=font)
    top = max((v for _, v, _ in rows if v is not None), default=0) or 1.0
    span = WIDTH - LABEL_W - 130
    for i, (label, value, unit) in enumerate(rows):
        y = 50 + i * ROW
        draw.text((12, y + 8), label[:45], fill="black", font=font)
        if value is None:
            draw.text((LABEL_W, y + 8), "n/a", fill="grey", font=font)
            continue
        length = max(1, round(span * value / top))
        draw.rectangle([LABEL_W, y + 4, LABEL_W + length, y + ROW - 6], fill=COLORS[i % len(COLORS)])
        draw.text((LABEL_W + length + 8, y + 8), f"{value:.3g} {unit}", fill="black", font=font)
    return image
