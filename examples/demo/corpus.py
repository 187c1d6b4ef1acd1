"""Synthetic image–text corpus for the demo: coloured shapes on varied backgrounds.

Each image holds 1–3 copies of one outlined shape kind in one colour (sizes, positions, background
tint/brightness/gradient/noise and the image's own size and aspect ratio vary). Rows are LLaVA JSONL:

    {"image": "images/000123.png", "conversations": [{"from": "human", "value": "<image>\\n…"},
                                                      {"from": "gpt", "value": "…"}, …]}

Files written under ``out_dir``:

- ``train.jsonl``   — image rows (a caption and/or 1–3 question turns, shuffled) + text-only rows
- ``heldout.jsonl`` — held-out images, one question per row, plus ``"attribute"``/``"answer"`` keys
- ``images.jsonl``  — every image's attributes (the stand-in teacher's supervision)
- ``lm_text.txt``   — the training images' captions (part of the stand-in LLM's text)
- ``meta.json``     — vocabulary lists, counts, seed

Everything is a pure function of the seed: rows, attributes, drawings and the faint sensor noise (numpy's
generator, seeded from the scene's random stream). With the same Pillow and numpy the files are byte-identical
on any machine (tests/test_demo.py hashes two builds).
"""

from __future__ import annotations

import colorsys
import json
import math
import os
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

COLOURS = {
    "red": (220, 30, 35),
    "green": (30, 165, 60),
    "blue": (35, 75, 225),
    "yellow": (240, 215, 25),
    "purple": (135, 45, 185),
    "orange": (250, 135, 20),
}
# Four shape kinds with a dark outline on light, varied backgrounds (tint, gradient, noise). Both choices
# make shape learnable by a tiny ViT in a few hundred steps: with fills of any colour on light *and* dark
# backgrounds (edges of either polarity) a from-scratch ViT / CNN / bag of patches stayed near chance on
# shape for 300+ steps, while colour was learned at once.
SHAPES = ("circle", "square", "triangle", "star")
MIN_RADIUS = 8.0  # pixels: smaller stars and triangles are blobs

PLURAL = {s: s + "s" for s in SHAPES}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
SIZES = ("small", "large")
ATTRIBUTES = ("colour", "shape", "count", "size")

# Each question kind has its own keyword (colour / shape / many, count / big, small), so the kind asked is
# easy to tell; the wording varies within a kind. Each wording is a (one shape, several shapes) pair, written out
# rather than derived, so that every question agrees with the number of shapes it is asked about. Size is only
# asked about a single shape.
QUESTIONS = {
    "colour": [("What colour is it?", "What colour are they?"),
               ("What is its colour?", "What is their colour?"),
               ("Which colour do you see?", "Which colour do you see?")],
    "shape": [("What shape is it?", "What shape are they?"),
              ("Which shape is shown?", "Which shape is shown?"),
              ("What kind of shape is this?", "What kind of shape are these?")],
    "count": [("How many are there?", "How many are there?"),
              ("How many objects do you see?", "How many objects do you see?"),
              ("Count the objects.", "Count the objects.")],
    "size": [("Is it small or large?", None), ("How big is it?", None)],
}
CAPTION_PROMPTS = ["Describe the image.", "What is in the picture?", "Give a short caption."]


@dataclass
class Scene:
    colour: str
    shape: str
    count: int
    size: str  # small | large
    position: str | None  # for single shapes: left | right | top | bottom | centre
    width: int
    height: int

    def answer(self, attribute: str) -> str:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "count": COUNT_WORDS[self.count],
            "size": self.size,
        }[attribute]

    def caption(self) -> str:
        if self.count == 1:
            if self.position == "centre":
                where = "in the centre"
            elif self.position in ("top", "bottom"):
                where = f"at the {self.position}"
            else:
                where = f"on the {self.position}"
            return f"a {self.size} {self.colour} {self.shape} {where} ."
        return f"{COUNT_WORDS[self.count]} {self.size} {self.colour} {PLURAL[self.shape]} ."


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def _shape_points(shape: str, cx: float, cy: float, r: float):
    """Polygon vertices of an upright triangle / star or an axis-aligned square (circles are drawn as ellipses)."""
    def poly(n, radii, phase):
        return [(cx + radii[k % len(radii)] * math.cos(phase + 2 * math.pi * k / n),
                 cy + radii[k % len(radii)] * math.sin(phase + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "square":
        return poly(4, [r * 1.0], math.pi / 4)
    if shape == "triangle":
        return poly(3, [r * 1.1], -math.pi / 2)
    if shape == "star":
        return poly(10, [r * 1.1, r * 0.45], -math.pi / 2)
    raise ValueError(shape)


def _background(rng: random.Random, w: int, h: int):
    """A light, desaturated background (so every shape colour and the dark outline stand out), any tint,
    flat or a gradient."""
    v = rng.uniform(0.55, 0.97)
    hue, sat = rng.random(), rng.uniform(0.0, 0.25)
    c1 = tuple(int(255 * x) for x in colorsys.hsv_to_rgb(hue, sat, v))
    if rng.random() < 0.5:
        img = Image.new("RGB", (w, h), c1)
    else:  # linear gradient to a nearby tone
        v2 = min(1.0, max(0.0, v + rng.uniform(-0.18, 0.18)))
        c2 = tuple(int(255 * x) for x in colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, sat, v2))
        if rng.random() < 0.5:
            t = np.linspace(0, 1, w)[None, :, None].repeat(h, 0)
        else:
            t = np.linspace(0, 1, h)[:, None, None].repeat(w, 1)
        c1, c2 = np.asarray(c1, dtype=np.float32), np.asarray(c2, dtype=np.float32)
        arr = c1 + (c2 - c1) * t
        img = Image.fromarray(arr.round().astype(np.uint8), "RGB")
    return img


def _jitter(rng: random.Random, rgb, amount=16):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)


def render(scene_rng: random.Random, min_side: int = 40, max_side: int = 84) -> tuple[Image.Image, Scene]:
    """Draw one random scene. Returns the image and its attributes."""
    rng = scene_rng
    # varied sizes and aspect ratios (up to 84:40, i.e. 1:2.1)
    w = rng.randint(min_side, max_side)
    h = rng.randint(min_side, max_side)
    colour = rng.choice(list(COLOURS))
    shape = rng.choice(SHAPES)
    size = rng.choice(SIZES)
    want = rng.choice([1, 1, 2, 3])
    bg = _background(rng, w, h)

    S = 4  # supersampling for anti-aliased edges
    big = bg.resize((w * S, h * S), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(big)
    side = min(w, h)
    # radius as a fraction of the short side: large shapes are clearly bigger than small ones
    frac = rng.uniform(0.34, 0.42) if size == "large" else rng.uniform(0.20, 0.25)
    r = max(MIN_RADIUS, frac * side)
    placed: list[tuple[float, float]] = []
    for _ in range(want):
        for _attempt in range(60):
            cx = rng.uniform(r + 1, w - r - 1) if w > 2 * r + 2 else w / 2
            cy = rng.uniform(r + 1, h - r - 1) if h > 2 * r + 2 else h / 2
            if all(math.hypot(cx - x, cy - y) > 2.15 * r for x, y in placed):
                placed.append((cx, cy))
                break
    count = len(placed)
    fill = _jitter(rng, COLOURS[colour])
    outline = _jitter(rng, (25, 25, 25), 15)
    ow = round(S * min(3.0, max(1.6, 0.09 * r)))  # outline width: 1.6–3 px
    for cx, cy in placed:
        if shape == "circle":
            draw.ellipse([(cx - r) * S, (cy - r) * S, (cx + r) * S, (cy + r) * S], fill=fill, outline=outline, width=ow)
        else:
            pts = [(x * S, y * S) for x, y in _shape_points(shape, cx, cy, r)]
            draw.polygon(pts, fill=fill, outline=outline, width=ow)
    img = big.resize((w, h), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:  # sensor-like noise: grey Gaussian noise around mid-grey, seeded from the scene's stream
        sigma = rng.uniform(4, 14)
        noise_rng = np.random.default_rng(rng.getrandbits(64))
        grey = np.clip(np.rint(128.0 + sigma * noise_rng.standard_normal((h, w))), 0, 255).astype(np.uint8)
        img = Image.blend(img, Image.fromarray(grey, "L").convert("RGB"), 0.06)
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(0.4))

    position = None
    if count == 1:
        cx, cy = placed[0]
        dx, dy = cx / w - 0.5, cy / h - 0.5
        if max(abs(dx), abs(dy)) < 0.12:
            position = "centre"
        elif abs(dx) >= abs(dy):
            position = "left" if dx < 0 else "right"
        else:
            position = "top" if dy < 0 else "bottom"
    return img, Scene(colour, shape, count, size, position, w, h)


# ------------------------------------------------------------------------------------------------
# rows
# ------------------------------------------------------------------------------------------------
def _askable(scene: Scene) -> list[str]:
    # size is only asked about single shapes (several shapes share one size, but keep it unambiguous)
    return [a for a in ATTRIBUTES if a != "size" or scene.count == 1]


def _question(rng: random.Random, attribute: str, scene: Scene) -> str:
    one, several = rng.choice(QUESTIONS[attribute])
    if scene.count > 1 and several is None:
        raise ValueError(f"{attribute} is only asked about a single shape")
    return one if scene.count == 1 else several


def image_row(rng: random.Random, path: str, scene: Scene) -> dict:
    """One training conversation about one image: 1–3 turns, always one that needs the shape (the hardest
    attribute to see: a shape question or a caption), plus 0–2 questions of other kinds, in random order."""
    others = [k for k in _askable(scene) if k != "shape"]
    rng.shuffle(others)
    turns = others[: rng.randint(0, 2)] + ["caption" if rng.random() < 0.35 else "shape"]
    rng.shuffle(turns)
    conv = []
    for i, kind in enumerate(turns):
        if kind == "caption":
            q, a = rng.choice(CAPTION_PROMPTS), scene.caption()
        else:
            q, a = _question(rng, kind, scene), scene.answer(kind)
        conv.append({"from": "human", "value": ("<image>\n" + q) if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"image": path, "conversations": conv}


def text_qa(rng: random.Random, scene: Scene) -> tuple[str, str]:
    """A text-only question about a scene described in words (what the stand-in LLM learns to read)."""
    kind = rng.choice(_askable(scene) + ["caption"])
    if kind == "caption":
        return f"Repeat the description : {scene.caption()}", scene.caption()
    return f"{scene.caption()}\n{_question(rng, kind, scene)}", scene.answer(kind)


def text_row(rng: random.Random, scene: Scene) -> dict:
    q, a = text_qa(rng, scene)
    return {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}


def random_scene(rng: random.Random) -> Scene:
    """Attributes only (no drawing), for text-only material."""
    count = rng.choice([1, 1, 2, 3])
    return Scene(
        colour=rng.choice(list(COLOURS)), shape=rng.choice(SHAPES), count=count, size=rng.choice(SIZES),
        position=rng.choice(["left", "right", "top", "bottom", "centre"]) if count == 1 else None,
        width=0, height=0,
    )


def vocabulary_texts() -> list[str]:
    """Every word the corpus can use (for the word-level tokenizer)."""
    words = [*COLOURS, *SHAPES, *PLURAL.values(), *COUNT_WORDS.values(), *SIZES,
             "left", "right", "top", "bottom", "centre", "a", "on", "the", "at", "in", ".",
             "Repeat", "description", ":"]
    texts = [" ".join(words)] + CAPTION_PROMPTS
    for pairs in QUESTIONS.values():
        texts += [q for pair in pairs for q in pair if q is not None]
    return texts


def generate(out_dir: str, n_train: int = 6000, n_heldout: int = 300, text_fraction: float = 0.08,
             seed: int = 0, min_side: int = 40, max_side: int = 84, log=print) -> dict:
    """Write the corpus (idempotent for a given configuration: an existing complete corpus is reused)."""
    settings = dict(n_train=n_train, n_heldout=n_heldout, text_fraction=text_fraction, seed=seed,
                    min_side=min_side, max_side=max_side, version=5)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("settings") == settings:
            log(f"corpus: reusing {out_dir}")
            return meta
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    rng = random.Random(seed)
    train_rows, heldout_rows, lm_lines, labels = [], [], [], []
    for i in range(n_train):
        img, scene = render(rng, min_side, max_side)
        rel = f"images/train_{i:06d}.png"
        img.save(os.path.join(out_dir, rel), compress_level=1)
        train_rows.append(image_row(rng, rel, scene))
        lm_lines.append(scene.caption())
        labels.append({"image": rel, "split": "train", **scene.__dict__})
    n_text = int(round(text_fraction * n_train))
    for _ in range(n_text):
        train_rows.append(text_row(rng, random_scene(rng)))
    rng.shuffle(train_rows)
    hrng = random.Random(seed + 1)
    for i in range(n_heldout):
        img, scene = render(hrng, min_side, max_side)
        rel = f"images/heldout_{i:06d}.png"
        img.save(os.path.join(out_dir, rel), compress_level=1)
        labels.append({"image": rel, "split": "heldout", **scene.__dict__})
        for attribute in _askable(scene):
            heldout_rows.append({
                "image": rel, "attribute": attribute, "answer": scene.answer(attribute),
                "conversations": [{"from": "human", "value": "<image>\n" + _question(hrng, attribute, scene)},
                                  {"from": "gpt", "value": scene.answer(attribute)}],
            })
    for name, rows in (("train.jsonl", train_rows), ("heldout.jsonl", heldout_rows), ("images.jsonl", labels)):
        with open(os.path.join(out_dir, name), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    with open(os.path.join(out_dir, "lm_text.txt"), "w") as f:
        f.write("\n".join(lm_lines) + "\n")
    meta = {
        "settings": settings,
        "train_rows": len(train_rows), "text_only_rows": n_text, "heldout_rows": len(heldout_rows),
        "heldout_images": n_heldout, "colours": list(COLOURS), "shapes": list(SHAPES),
        "counts": list(COUNT_WORDS.values()), "sizes": list(SIZES),
    }
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    log(f"corpus: {n_train} training images + {n_text} text-only rows, {n_heldout} held-out images "
        f"({len(heldout_rows)} questions) in {out_dir}")
    return meta
