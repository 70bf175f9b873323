"""A synthetic captioned video set — coloured shapes moving on a plain background — and the pixel check.

    captions(split) -> [Caption]            "a red square moving right", ...; split "train" | "heldout" | "all"
    render(caption, frames, height, width, rng) -> [F, H, W, 3] uint8
    analyse(frames [F, H, W, 3] uint8, directions=DIRECTIONS) -> Analysis: dominant non-background colour and the
        direction the colour mass moves in (None where the video shows no clear shape / motion)
    score(caption, analysis) -> {"colour": bool, "direction": bool, "both": bool}

Held-out captions are whole colour x direction pairs never seen in training (each colour and each direction
is seen in training with the other partners), in both shapes: the generator has to compose them.

The LoRA phase's new concept is a motion the base never saw, named by a word it never read: "diagonally" (down and
to the right at once; `new_captions()`). A motion, not a new colour or shape, because the demo's VAE only learnt the
training clips' palette and shapes: it decodes yellow, magenta, cyan or white as blue or green and a triangle as a
circle (measured on the trained VAE), while it keeps a diagonal path readable (the analyser reads its round trips
right), so the concept is one the latent space can hold and only the MM-DiT has to learn.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = np.array([24, 24, 24], np.float32)
COLOURS = {"red": (230, 40, 40), "green": (40, 210, 60), "blue": (50, 90, 240)}
SHAPES = ("square", "circle")
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}  # (dx, dy) in image coordinates
HELDOUT_PAIRS = {("red", "right"), ("green", "left"), ("blue", "down")}
WORDS = (*COLOURS, *SHAPES, *DIRECTIONS, "moving")  # caption words (whole tokens of the tiny tokenizers)
# The LoRA phase's new concept: never in the base's clips or its tokenizers' vocabularies (byte tokens only).
NEW_DIRECTIONS = {"diagonally": (1, 1)}
ALL_DIRECTIONS = {**DIRECTIONS, **NEW_DIRECTIONS}

FG_THRESHOLD = 60.0  # RGB distance from the background above which a pixel is foreground
MIN_FG_PIXELS = 4  # per frame, for a centroid
MIN_SHIFT = 0.15  # centroid travel over the clip, as a fraction of the frame size along the prompted axis


@dataclass(frozen=True)
class Caption:
    colour: str
    shape: str
    direction: str

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @property
    def heldout(self) -> bool:
        return (self.colour, self.direction) in HELDOUT_PAIRS

    @property
    def new(self) -> bool:
        """The LoRA phase's new concept (a direction the base never saw)."""
        return self.direction in NEW_DIRECTIONS


def captions(split: str = "all") -> list[Caption]:
    """Every colour x shape x direction caption of `split` ("train", "heldout" or "all"), in a fixed order."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"captions: split must be 'train', 'heldout' or 'all', got {split!r}")
    out = [Caption(c, s, d) for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    return [c for c in out if split == "all" or c.heldout == (split == "heldout")]


def new_captions() -> list[Caption]:
    """Every colour x shape with the new direction, in a fixed order (the LoRA phase's concept)."""
    return [Caption(c, s, d) for c in COLOURS for s in SHAPES for d in NEW_DIRECTIONS]


def render(caption: Caption, frames: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """One clip [F, H, W, 3] uint8: the shape (size half the frame height) moves at constant speed over
    about half the frame along its direction, from a random start that keeps it inside the frame."""
    r = 0.25 * height  # half-size of the shape
    dx, dy = ALL_DIRECTIONS[caption.direction]
    travel = np.array([0.5 * width * dx, 0.5 * height * dy])  # total displacement in pixels (x, y)
    lo = np.array([r, r]) + np.maximum(0, -travel)
    hi = np.array([width - r, height - r]) - np.maximum(0, travel)
    start = rng.uniform(lo, hi)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    colour = np.array(COLOURS[caption.colour], np.float32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for f in range(frames):
        cx, cy = start + travel * f / max(frames - 1, 1)
        if caption.shape == "square":
            mask = (np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r)
        else:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= (1.15 * r) ** 2  # about the square's area
        out[f] = np.where(mask[..., None], colour, BACKGROUND).astype(np.uint8)
    return out


@dataclass(frozen=True)
class Analysis:
    colour: str | None  # the palette colour nearest to most foreground pixels; None: no foreground
    direction: str | None  # the prompted-axis direction of the colour mass; None: no clear motion
    shift: tuple[float, float]  # centroid travel (dx, dy) over the clip, as fractions of (width, height)
    foreground: float  # mean fraction of foreground pixels per frame


def analyse(frames: np.ndarray, directions: dict[str, tuple[int, int]] = DIRECTIONS) -> Analysis:
    """frames [F, H, W, 3] uint8 -> the dominant non-background colour and the direction of the colour mass.

    Foreground = pixels farther than FG_THRESHOLD from the background colour. Colour: majority vote of the
    foreground pixels' nearest palette colours. Direction: the least-squares slope of the foreground centroid
    over the frames with >= MIN_FG_PIXELS foreground pixels, times the clip length, as a fraction of the frame
    size (the shift); the name in `directions` whose unit vector is nearest in angle, if the shift along it is
    at least MIN_SHIFT (for the four axis directions: the larger axis). ALL_DIRECTIONS adds the new concept."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"analyse: frames must be [F, H, W, 3], got shape {frames.shape}")
    f, h, w, _ = frames.shape
    x = frames.astype(np.float32)
    fg = np.linalg.norm(x - BACKGROUND, axis=-1) > FG_THRESHOLD  # [F, H, W]
    palette = np.array(list(COLOURS.values()), np.float32)  # [K, 3]
    colour = None
    if fg.any():
        nearest = np.argmin(np.linalg.norm(x[fg][:, None] - palette[None], axis=-1), axis=1)
        colour = list(COLOURS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    idx, cxs, cys = [], [], []
    for i in range(f):
        n = fg[i].sum()
        if n >= MIN_FG_PIXELS:
            idx.append(i)
            cxs.append(xx[fg[i]].mean() / w)
            cys.append(yy[fg[i]].mean() / h)
    shift = (0.0, 0.0)
    direction = None
    if len(idx) >= 2:
        t = np.asarray(idx, np.float32)
        slope = [np.polyfit(t, np.asarray(c), 1)[0] * (f - 1) for c in (cxs, cys)]
        shift = (float(slope[0]), float(slope[1]))
        along = {name: float(np.dot(v, shift) / np.linalg.norm(v)) for name, v in directions.items()}
        best = max(along, key=along.get)  # ties: the first listed (right before down)
        if along[best] >= MIN_SHIFT:
            direction = best
    return Analysis(colour, direction, shift, float(fg.mean()))


def score(caption: Caption, analysis: Analysis) -> dict[str, bool]:
    colour, direction = analysis.colour == caption.colour, analysis.direction == caption.direction
    return {"colour": colour, "direction": direction, "both": colour and direction}
