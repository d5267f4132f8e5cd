"""Procedural captioned pictures for the bundled default model: one plain shape on a plain background.

A scene is one object (a colour, a shape, a size and a position on a 3x3 grid) on a background colour.
Captions name the colour and the shape always, and the size, position and background sometimes, in varied
phrasing; what a caption leaves out is still drawn at random, so the model learns to fill it in.

Some (colour, shape) pairs are held out of training (HELDOUT_COMBOS): each colour and each shape is seen,
only not together, so the evaluation measures whether the model composes words it knows.

Everything is deterministic given a seed (random.Random). Rendering is vectorised torch (CPU or GPU), so the
trainer draws fresh batches on the accelerator; `render_pil` gives the same pictures as PIL images.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

# Object colours: saturated and far apart in RGB, so that "nearest palette colour" is a fair judge.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (245, 215, 30),
    "green": (40, 160, 60),
    "cyan": (30, 190, 210),
    "blue": (35, 70, 210),
    "purple": (130, 55, 180),
    "pink": (240, 120, 190),
    "brown": (125, 75, 35),
    "black": (25, 25, 25),
}
# Backgrounds (white most often: it is the README's example). None of them is an object colour except black,
# and a black object is never drawn on black.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (150, 150, 150),
    "beige": (235, 222, 195),
}
BACKGROUND_WEIGHTS = {"white": 0.55, "black": 0.15, "gray": 0.15, "beige": 0.15}
BACKGROUND_WORDS = {
    "white": ["white"],
    "black": ["black"],
    "gray": ["gray", "grey"],
    "beige": ["beige", "cream"],
}

SHAPES = ("circle", "square", "triangle")
# Half the object's extent, as a fraction of the image side.
SIZES = {"small": 0.09, "medium": 0.15, "large": 0.24}
SIZE_WORDS = {
    "small": ["small", "tiny", "little"],
    "medium": ["medium", "medium-sized", "mid-sized"],
    "large": ["large", "big", "huge"],
}
# 3x3 grid: (column, row) of each named position; centres at 0.22 / 0.5 / 0.78 of the side.
POSITIONS: dict[str, tuple[int, int]] = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
GRID_CENTRES = (0.22, 0.5, 0.78)
POSITION_PHRASES: dict[str, list[str]] = {
    "top left": ["in the top left", "in the top left corner", "in the upper left", "at the top left"],
    "top right": ["in the top right", "in the top right corner", "in the upper right", "at the top right"],
    "bottom left": [
        "in the bottom left",
        "in the bottom left corner",
        "in the lower left",
        "at the bottom left",
    ],
    "bottom right": [
        "in the bottom right",
        "in the bottom right corner",
        "in the lower right",
        "at the bottom right",
    ],
    "top": ["at the top", "near the top", "at the top of the image"],
    "bottom": ["at the bottom", "near the bottom", "at the bottom of the image"],
    "left": ["on the left", "on the left side", "at the left"],
    "right": ["on the right", "on the right side", "at the right"],
    "center": ["in the center", "in the centre", "in the middle"],
}

# Pairs never drawn in training: one per colour for eight colours (red and black keep all three shapes, so
# the README's "a red circle" is a trained pair). Every colour and every shape still occurs in training.
HELDOUT_COMBOS: tuple[tuple[str, str], ...] = (
    ("orange", "triangle"),
    ("yellow", "square"),
    ("green", "circle"),
    ("cyan", "triangle"),
    ("blue", "square"),
    ("purple", "circle"),
    ("pink", "triangle"),
    ("brown", "square"),
)
TRAIN_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for c in COLOURS for s in SHAPES if (c, s) not in HELDOUT_COMBOS
)


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    size: str
    position: str
    background: str
    cx: float  # centre, fraction of width
    cy: float  # centre, fraction of height (0 = top)
    half: float  # half extent, fraction of the side


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str
    mentions: frozenset[str]  # which of "size", "position", "background" the caption states


def sample_scene(rng: random.Random, split: str = "train", combo: tuple[str, str] | None = None) -> Scene:
    """One random scene; its (colour, shape) comes from the split's pairs unless `combo` is given."""
    if combo is None:
        combos = TRAIN_COMBOS if split == "train" else HELDOUT_COMBOS
        combo = combos[rng.randrange(len(combos))]
    colour, shape = combo
    backgrounds = [b for b in BACKGROUNDS if not (b == "black" and colour == "black")]
    background = rng.choices(backgrounds, weights=[BACKGROUND_WEIGHTS[b] for b in backgrounds])[0]
    size = rng.choice(list(SIZES))
    position = rng.choice(list(POSITIONS))
    half = SIZES[size] * rng.uniform(0.9, 1.1)
    col, row = POSITIONS[position]
    lo, hi = half + 0.03, 1.0 - half - 0.03  # keep the whole object inside the picture

    def place(i: int) -> float:
        return min(max(GRID_CENTRES[i] + rng.uniform(-0.04, 0.04), lo), hi)

    return Scene(colour, shape, size, position, background, place(col), place(row), half)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def make_caption(scene: Scene, rng: random.Random) -> tuple[str, frozenset[str]]:
    """A natural caption that always names colour and shape; size, position and background are optional."""
    mentions = set()
    adjectives = [scene.colour]
    if rng.random() < 0.5:
        adjectives.insert(0, rng.choice(SIZE_WORDS[scene.size]))
        mentions.add("size")
    obj = " ".join(adjectives + [scene.shape])
    obj = f"{_article(obj)} {obj}" if rng.random() < 0.9 else ("one " + obj)
    where = ""
    if rng.random() < 0.6:
        where = rng.choice(POSITION_PHRASES[scene.position])
        mentions.add("position")
    bg_word = rng.choice(BACKGROUND_WORDS[scene.background])
    with_bg = rng.random() < 0.6
    if with_bg:
        mentions.add("background")
    obj_where = f"{obj} {where}".strip()
    if with_bg:
        template = rng.choice(
            [
                "{o} on a {b} background",
                "{o} on a plain {b} background",
                "{o}, {b} background",
                "{o} against a {b} background",
                "a {b} background with {o}",
                "a picture of {o} on a {b} background",
                "an image of {o} on {b}",
                "a drawing of {o} on a {b} background",
            ]
        )
    else:
        template = rng.choice(
            ["{o}", "a picture of {o}", "an image of {o}", "a drawing of {o}", "there is {o}"]
        )
    caption = template.format(o=obj_where, b=bg_word)
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.2:
        caption += "."
    return caption, frozenset(mentions)


def make_examples(seed: int, count: int, split: str = "train") -> list[Example]:
    """`count` captioned scenes of a split ("train" or "heldout"), the same for the same seed."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return draw_examples(random.Random(f"{split}:{seed}"), count, split)


def draw_examples(rng: random.Random, count: int, split: str = "train") -> list[Example]:
    """`count` captioned scenes of a split drawn from `rng` (the trainer keeps one rng across batches)."""
    out = []
    for _ in range(count):
        scene = sample_scene(rng, split)
        caption, mentions = make_caption(scene, rng)
        out.append(Example(scene, caption, mentions))
    return out


def vocabulary() -> list[str]:
    """Every word and punctuation mark a caption can contain, lower case (for the tokenizers)."""
    rng = random.Random(0)
    words: set[str] = set()
    for combo in TRAIN_COMBOS + HELDOUT_COMBOS:
        for _ in range(400):
            caption, _ = make_caption(sample_scene(rng, combo=combo), rng)
            words.update(_split_words(caption.lower()))
    for phrases in [*POSITION_PHRASES.values(), *SIZE_WORDS.values(), *BACKGROUND_WORDS.values()]:
        for phrase in phrases:
            words.update(_split_words(phrase))
    return sorted(words)


def _split_words(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        if ch.isalnum() or ch == "-":
            word += ch
            continue
        if word:
            out.append(word)
            word = ""
        if not ch.isspace():
            out.append(ch)
    return out + ([word] if word else [])


def scene_params(scenes: list[Scene]) -> torch.Tensor:
    """(N, 10) float rows: cx, cy, half (fractions), shape index, object RGB, background RGB (0..1)."""
    return torch.tensor(
        [
            [s.cx, s.cy, s.half, SHAPES.index(s.shape)]
            + [c / 255 for c in COLOURS[s.colour]]
            + [c / 255 for c in BACKGROUNDS[s.background]]
            for s in scenes
        ],
        dtype=torch.float32,
    )


def render(scenes: list[Scene], size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """Pictures of the scenes as a float tensor (N, 3, size, size) in [0, 1], edges anti-aliased."""
    return render_params(scene_params(scenes).to(device), size)


def render_params(params: torch.Tensor, size: int) -> torch.Tensor:
    """render() from scene_params() rows already on the target device (the trainer builds them elsewhere).

    Each shape is a signed distance (negative inside, in pixels); coverage = clamp(0.5 - d) gives a one-pixel
    soft edge, which is what a rasteriser with box-filter anti-aliasing would draw.
    """
    n = params.shape[0]
    p = params.view(n, 10, 1, 1)
    cx, cy, h, kind = p[:, 0] * size, p[:, 1] * size, p[:, 2] * size, p[:, 3].round()
    coords = torch.arange(size, device=params.device, dtype=torch.float32) + 0.5
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    dx, dy = x - cx, y - cy
    circle = torch.sqrt(dx * dx + dy * dy) - h
    square = torch.maximum(dx.abs(), dy.abs()) - h
    # Upright isosceles triangle: apex (cx, cy - h), base corners (cx +- h, cy + h). The slanted sides are the
    # lines 2|dx| - dy - h = 0 with outward normals (+-2, -1)/sqrt(5); the base is dy = h.
    slant = (2 * dx.abs() - dy - h) / 5**0.5
    triangle = torch.maximum(slant, dy - h)
    dist = torch.where(kind == 0, circle, torch.where(kind == 1, square, triangle))
    cover = (0.5 - dist).clamp(0, 1).unsqueeze(1)
    fg, bg = params[:, 4:7].view(n, 3, 1, 1), params[:, 7:10].view(n, 3, 1, 1)
    return bg + (fg - bg) * cover


def to_pil(images: torch.Tensor):
    """(N, 3, H, W) in [0, 1] -> list of PIL RGB images."""
    from PIL import Image

    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def render_pil(scene: Scene, size: int):
    return to_pil(render([scene], size))[0]
