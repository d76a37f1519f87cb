"""The synthetic "shapes" task: small coloured shapes (and sometimes a drawn letter) on a plain or textured
background, with questions whose answers need the right few visual tokens.

Everything is deterministic from a seed. A scene is drawn from ``random.Random(seed)``; the three splits use
disjoint seed ranges, so they never share a scene. Every answer is a single word.

Question types (``QUESTION_TYPES``):

* ``color`` -- "what color is the circle ?" (the shape is unique in the scene)
* ``shape`` -- "what shape is the red object ?" (the colour is unique)
* ``count`` -- "how many objects are there ?", "how many red objects are there ?", "how many squares are there ?"
* ``position`` -- absolute position: "what shape is in the top-left ?" or "where is the red circle ?"
* ``relation`` -- "what shape is left of the red square ?" (exactly one object is entirely on that side)
* ``letter`` -- "what letter is shown ?"

Objects never straddle the image's middle lines, so every object is in exactly one quadrant.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont

SIZE = 96  # image side in pixels
PATCH = 8  # vision patch side: 12 x 12 = 144 visual tokens
COLORS = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 200, 30),
    "purple": (145, 60, 185),
    "orange": (245, 135, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
LETTERS = "AEHKMRTX"
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
RELATIONS = {"left": (-1, 0), "right": (1, 0), "above": (0, -1), "below": (0, 1)}
QUESTION_TYPES = ("color", "shape", "count", "position", "relation", "letter")
SPLITS = {"train": 10_000_000, "validation": 1_000_000, "test": 0}  # first seed of each split
SPLIT_SIZE = 1_000_000  # seeds per split before the next one starts (train is open-ended)
NUMBERS = ("zero", "one", "two", "three", "four", "five")
WORDS = (
    "what color is the shape object how many objects are there in where of letter shown ? left right above below"
).split()


@dataclass
class Thing:
    """One object of a scene: a shape of a colour, centred at (x, y) pixels with half-size r, or the letter tile
    (``shape == "letter"``, ``color`` is the letter)."""

    shape: str
    color: str
    x: int
    y: int
    r: int

    @property
    def quadrant(self) -> str:
        return QUADRANTS[2 * (self.y >= SIZE // 2) + (self.x >= SIZE // 2)]

    def box(self) -> tuple[int, int, int, int]:
        return self.x - self.r, self.y - self.r, self.x + self.r, self.y + self.r


@dataclass
class Scene:
    """What a seed draws: the objects, an optional letter tile, and the background."""

    seed: int
    things: list[Thing]
    letter: Thing | None
    background: tuple[int, int, int]
    texture: str  # "plain", "noise" or "stripes"
    extra: dict = field(default_factory=dict)


@dataclass
class Sample:
    """One question about one scene."""

    seed: int
    kind: str
    question: str
    answer: str
    scene: Scene


def vocabulary() -> list[str]:
    """Every word the task uses, in a fixed order (the embedded model's tokenizer is built from it)."""
    words = list(WORDS) + list(COLORS) + list(SHAPES) + [s + "s" for s in SHAPES] + list(QUADRANTS)
    words += list(NUMBERS) + [c.lower() for c in LETTERS] + ["answer", ":", "describe", "scene"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def _place(rng: random.Random, r: int, taken: list[tuple[int, int, int]]) -> tuple[int, int] | None:
    """A centre for a thing of half-size ``r`` inside one quadrant (clear of the middle lines by 2 px) and 3 px
    clear of everything in ``taken``."""
    half = SIZE // 2
    for _ in range(50):
        qx, qy = rng.randrange(2), rng.randrange(2)
        x = rng.randint(qx * half + r + 2, (qx + 1) * half - r - 3)
        y = rng.randint(qy * half + r + 2, (qy + 1) * half - r - 3)
        if all(max(abs(x - tx), abs(y - ty)) > r + tr + 3 for tx, ty, tr in taken):
            return x, y
    return None


def scene(seed: int, attempt: int = 0) -> Scene:
    """The scene of ``seed``: 1 to 4 shapes, a letter tile in about 40% of scenes. ``attempt > 0`` draws a further
    scene that belongs to the same seed (string-seeded, so it is never another seed's scene)."""
    rng = random.Random(seed if attempt == 0 else f"{seed}:{attempt}")
    count = rng.randint(1, 4)
    taken: list[tuple[int, int, int]] = []
    things = []
    letter = None
    if rng.random() < 0.4:
        r = 8
        spot = _place(rng, r, taken)
        if spot is not None:
            letter = Thing("letter", rng.choice(LETTERS), spot[0], spot[1], r)
            taken.append((spot[0], spot[1], r))
    for _ in range(count):
        r = rng.randint(5, 8)
        spot = _place(rng, r, taken)
        if spot is None:
            break
        things.append(Thing(rng.choice(SHAPES), rng.choice(list(COLORS)), spot[0], spot[1], r))
        taken.append((spot[0], spot[1], r))
    grey = rng.randint(200, 245)
    background = tuple(min(255, grey + rng.randint(-12, 12)) for _ in range(3))
    texture = rng.choice(("plain", "plain", "noise", "stripes"))
    return Scene(seed, things, letter, background, texture, {"texture_seed": rng.getrandbits(32)})


_FONT = None


def _font():
    global _FONT
    if _FONT is None:
        _FONT = ImageFont.load_default(size=14)
    return _FONT


def render(s: Scene) -> Image.Image:
    """The scene as a ``SIZE x SIZE`` RGB image."""
    image = Image.new("RGB", (SIZE, SIZE), s.background)
    draw = ImageDraw.Draw(image)
    rng = random.Random(s.extra["texture_seed"])
    if s.texture == "noise":
        for _ in range(400):
            x, y = rng.randrange(SIZE), rng.randrange(SIZE)
            shade = tuple(max(0, c - rng.randint(10, 35)) for c in s.background)
            draw.rectangle((x, y, x + 1, y + 1), fill=shade)
    elif s.texture == "stripes":
        step = rng.randint(5, 9)
        shade = tuple(max(0, c - 18) for c in s.background)
        for offset in range(-SIZE, SIZE, step):
            draw.line((offset, 0, offset + SIZE, SIZE), fill=shade, width=1)
    for t in s.things:
        fill = COLORS[t.color]
        x0, y0, x1, y1 = t.box()
        if t.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif t.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif t.shape == "triangle":
            draw.polygon([(t.x, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            draw.polygon([(t.x, y0), (x1, t.y), (t.x, y1), (x0, t.y)], fill=fill)
    if s.letter is not None:
        t = s.letter
        draw.rectangle(t.box(), fill=(255, 255, 255), outline=(30, 30, 30))
        draw.text((t.x, t.y + 1), t.color, fill=(0, 0, 0), font=_font(), anchor="mm")
    return image


def _unique(things: list[Thing], key) -> list[Thing]:
    values = [key(t) for t in things]
    return [t for t in things if values.count(key(t)) == 1]


def _side(target: Thing, other: Thing, relation: str) -> bool:
    dx, dy = RELATIONS[relation]
    if dx:
        return dx * (other.x - target.x) > other.r + target.r
    return dy * (other.y - target.y) > other.r + target.r


def ask(s: Scene, kind: str, rng: random.Random) -> tuple[str, str] | None:
    """A ``(question, answer)`` of type ``kind`` about scene ``s`` with one right answer, or ``None`` when the scene
    allows none."""
    things = s.things
    if kind == "color":
        pool = _unique(things, lambda t: t.shape)
        if pool:
            t = rng.choice(pool)
            return f"what color is the {t.shape} ?", t.color
    elif kind == "shape":
        pool = _unique(things, lambda t: t.color)
        if pool:
            t = rng.choice(pool)
            return f"what shape is the {t.color} object ?", t.shape
    elif kind == "count":
        form = rng.randrange(3)
        if form == 0:
            return "how many objects are there ?", NUMBERS[len(things)]
        if form == 1:
            color = rng.choice(list(COLORS))
            return f"how many {color} objects are there ?", NUMBERS[sum(t.color == color for t in things)]
        shape = rng.choice(SHAPES)
        return f"how many {shape}s are there ?", NUMBERS[sum(t.shape == shape for t in things)]
    elif kind == "position":
        if rng.random() < 0.5:
            quadrants = [q for q in QUADRANTS if sum(t.quadrant == q for t in things) == 1]
            if quadrants:
                q = rng.choice(quadrants)
                return f"what shape is in the {q} ?", next(t.shape for t in things if t.quadrant == q)
        pool = _unique(things, lambda t: (t.color, t.shape))
        if pool:
            t = rng.choice(pool)
            return f"where is the {t.color} {t.shape} ?", t.quadrant
    elif kind == "relation":
        options = []
        for t in _unique(things, lambda t: (t.color, t.shape)):
            for relation in RELATIONS:
                others = [o for o in things if o is not t and _side(t, o, relation)]
                if len(others) == 1:
                    options.append((t, relation, others[0]))
        if options:
            t, relation, other = rng.choice(options)
            word = relation if relation in ("above", "below") else f"{relation} of"
            return f"what shape is {word} the {t.color} {t.shape} ?", other.shape
    elif kind == "letter":
        if s.letter is not None:
            return "what letter is shown ?", s.letter.color.lower()
    else:
        raise ValueError(f"unknown question type {kind!r}; choose from {QUESTION_TYPES}")
    return None


def describe(s: Scene) -> str:
    """A caption listing every object as ``colour shape quadrant`` (quadrants in reading order, then left to right)
    and the letter: the embedded model's auxiliary training text."""
    order = sorted(s.things, key=lambda t: (QUADRANTS.index(t.quadrant), t.x))
    words = [f"{t.color} {t.shape} {t.quadrant}" for t in order]
    if s.letter is not None:
        words.append(f"letter {s.letter.color.lower()}")
    return " ".join(words)


def sample(seed: int, kind: str | None = None) -> Sample:
    """The question of ``seed`` (of type ``kind``, or of a type drawn from the seed), redrawing the scene from
    derived seeds until it allows one."""
    rng = random.Random(seed * 7919 + 17)
    kind = kind or rng.choice(QUESTION_TYPES)
    for attempt in range(100):
        s = scene(seed, attempt)
        qa = ask(s, kind, rng)
        if qa is not None:
            return Sample(seed, kind, qa[0], qa[1], s)
    raise RuntimeError(f"no scene near seed {seed} allows a {kind!r} question")


def split(name: str, n: int, start: int = 0) -> list[Sample]:
    """``n`` samples of split ``name`` ("train", "validation", "test"), question types in turn."""
    if name not in SPLITS:
        raise ValueError(f"unknown split {name!r}; choose from {sorted(SPLITS)}")
    if not isinstance(n, int) or n < 0 or (name != "train" and start + n > SPLIT_SIZE):
        raise ValueError(f"n must be an int in [0, {SPLIT_SIZE - start}], got {n!r}")
    first = SPLITS[name]
    return [sample(first + i, QUESTION_TYPES[i % len(QUESTION_TYPES)]) for i in range(start, start + n)]


def patch_words(s: Scene) -> list[list[str]]:
    """Per patch (raster order), the words that describe what lies under its centre: an object's colour, shape and
    quadrant (plus ``object`` on the patch holding its centre), or ``letter`` and the letter; nothing for background.
    The embedded model's projector learns to map each patch near these words' embeddings."""
    side = SIZE // PATCH
    out: list[list[str]] = [[] for _ in range(side * side)]
    for i in range(side * side):
        py, px = divmod(i, side)
        cx, cy = px * PATCH + PATCH / 2, py * PATCH + PATCH / 2
        for t in s.things:
            x0, y0, x1, y1 = t.box()
            if x0 - 1 <= cx <= x1 + 1 and y0 - 1 <= cy <= y1 + 1:
                out[i] = [t.color, t.shape, t.quadrant]
        if s.letter is not None:
            x0, y0, x1, y1 = s.letter.box()
            if x0 - 1 <= cx <= x1 + 1 and y0 - 1 <= cy <= y1 + 1:
                out[i] = ["letter", s.letter.color.lower()]
    for t in s.things:
        out[(t.y // PATCH) * side + t.x // PATCH].append("object")
    return out


def patch_labels(s: Scene) -> tuple[list[int], list[int]]:
    """Per patch (raster order), the object class under its centre (``1 + colour * len(SHAPES) + shape``, 0 for
    background) and the letter class (``1 + index``, 0 for none): the embedded model's auxiliary targets."""
    objects, letters = [], []
    colors = list(COLORS)
    for py in range(SIZE // PATCH):
        for px in range(SIZE // PATCH):
            cx, cy = px * PATCH + PATCH / 2, py * PATCH + PATCH / 2
            label = letter = 0
            for t in s.things:
                x0, y0, x1, y1 = t.box()
                if x0 - 1 <= cx <= x1 + 1 and y0 - 1 <= cy <= y1 + 1:
                    label = 1 + colors.index(t.color) * len(SHAPES) + SHAPES.index(t.shape)
            if s.letter is not None:
                x0, y0, x1, y1 = s.letter.box()
                if x0 - 1 <= cx <= x1 + 1 and y0 - 1 <= cy <= y1 + 1:
                    letter = 1 + LETTERS.index(s.letter.color)
            objects.append(label)
            letters.append(letter)
    return objects, letters


def write_examples(folder, per_type: int = 1, start: int = 900_000) -> list[dict]:
    """Save test-split scenes as PNGs in ``folder`` (``per_type`` per question type, from test seed ``start`` on,
    away from the first seeds the tests and the bench use) with ``examples.json`` listing their questions and
    answers; returns that list."""
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, s in enumerate(split("test", per_type * len(QUESTION_TYPES), start=start)):
        name = f"shapes-{i + 1}.png"
        render(s.scene).save(folder / name)
        out.append({"image": name, "question": s.question, "answer": s.answer, "kind": s.kind, "seed": s.seed})
    (folder / "examples.json").write_text(json.dumps(out, indent=1) + "\n")
    return out
