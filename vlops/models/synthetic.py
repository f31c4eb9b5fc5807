"""Synthetic vision-language data, generated in-process (nothing to download).

Each image shows one coloured shape (square, circle or triangle) in one of four quadrants, on a dark
background with optional pixel noise. Its caption describes it ("a red circle in the top left"); questions
ask about it ("what colour is the circle ?" -> "red"). The 48 concepts (4 colours x 3 shapes x 4 places)
give zero-shot classification a chance level of 1/48.

    g = torch.Generator().manual_seed(0)
    batch = make_pairs(64, g)             # batch.images [64, 3, 32, 32] in [-1, 1], batch.tokens [64, L]
    qa = make_vqa(64, g)                  # qa.images, qa.question [64, L], qa.answer [64] (ids in ANSWERS)
    captions = class_captions()           # [48, L] token ids of one caption per concept, in concept order

Every function draws only from the generator it is given, so a seed fixes the data.
"""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["COLOURS", "SHAPES", "PLACES", "ANSWERS", "VOCAB", "PAD", "BOS", "EOS", "NUM_CONCEPTS",
           "Pairs", "QA", "Tokenizer", "tokenizer", "render", "make_pairs", "make_vqa", "class_captions",
           "concept_of", "caption_of"]

COLOURS = {"red": (0.95, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.3, 1.0),
           "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("square", "circle", "triangle")
PLACES = ("top left", "top right", "bottom left", "bottom right")
NUM_CONCEPTS = len(COLOURS) * len(SHAPES) * len(PLACES)

PAD, BOS, EOS = 0, 1, 2
_SPECIAL = ("<pad>", "<bos>", "<eos>")
_WORDS = ("a", "an", "the", "photo", "picture", "image", "of", "in", "at", "on", "shape", "is", "what",
          "colour", "where", "which", "there", "?", "yes", "no", "top", "bottom", "left", "right")
VOCAB = _SPECIAL + tuple(dict.fromkeys(_WORDS + tuple(COLOURS) + SHAPES))
#: the answers of :func:`make_vqa`: every colour, shape and place, and yes / no
ANSWERS = tuple(COLOURS) + SHAPES + PLACES + ("yes", "no")

_TEMPLATES = ("a {c} {s} in the {p}", "a photo of a {c} {s} in the {p}", "the {c} {s} is in the {p}",
              "a picture of a {c} {s} at the {p}", "an image of a {c} {s} in the {p}")


class Tokenizer:
    """Word-level tokenizer over :data:`VOCAB`: ``<bos> words <eos>`` then ``<pad>`` up to ``length``."""

    def __init__(self, length: int = 16):
        if not isinstance(length, int) or length < 3:
            raise ValueError(f"length must be an int >= 3, got {length!r}")
        self.length = length
        self.index = {w: i for i, w in enumerate(VOCAB)}

    @property
    def vocab_size(self) -> int:
        return len(VOCAB)

    def encode(self, text: str) -> list[int]:
        try:
            ids = [self.index[w] for w in text.replace("?", " ?").split()]
        except KeyError as e:
            raise ValueError(f"text: word {e.args[0]!r} is not in the vocabulary") from None
        ids = [BOS] + ids + [EOS]
        if len(ids) > self.length:
            raise ValueError(f"text: {len(ids)} tokens with <bos> and <eos>, more than length={self.length}")
        return ids + [PAD] * (self.length - len(ids))

    def __call__(self, texts) -> torch.Tensor:
        """[len(texts), length] int64 token ids (a str gives [1, length])."""
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.int64).reshape(len(texts), self.length)

    def decode(self, ids) -> str:
        return " ".join(VOCAB[int(i)] for i in ids if int(i) not in (PAD, BOS, EOS))


tokenizer = Tokenizer()


def concept_of(colour: torch.Tensor, shape: torch.Tensor, place: torch.Tensor) -> torch.Tensor:
    """The concept id ``(colour * len(SHAPES) + shape) * len(PLACES) + place`` in [0, NUM_CONCEPTS)."""
    return (colour * len(SHAPES) + shape) * len(PLACES) + place


def caption_of(colour: int, shape: int, place: int, template: int = 0) -> str:
    return _TEMPLATES[template].format(c=list(COLOURS)[colour], s=SHAPES[shape], p=PLACES[place])


def render(colour: torch.Tensor, shape: torch.Tensor, place: torch.Tensor, g: torch.Generator | None = None, *,
           image_size: int = 32, noise: float = 0.1, jitter: bool = True) -> torch.Tensor:
    """[n, 3, S, S] images in [-1, 1]: shape ``shape[i]`` of colour ``colour[i]`` in quadrant ``place[i]``.

    The shape's size is about 3/8 of the image; with ``jitter`` its centre moves randomly within the
    quadrant (drawn from ``g``); ``noise`` is the standard deviation of the background's pixel noise.
    """
    S = int(image_size)
    if S < 8 or S % 4:
        raise ValueError(f"image_size must be a multiple of 4, at least 8; got {image_size!r}")
    n = colour.shape[0]
    half, r = S / 2, 0.17 * S
    cy = (place // 2).float() * half + half / 2
    cx = (place % 2).float() * half + half / 2
    if jitter:
        span = half / 2 - r
        cy = cy + (torch.rand(n, generator=g) * 2 - 1) * span
        cx = cx + (torch.rand(n, generator=g) * 2 - 1) * span
    grid = torch.arange(S, dtype=torch.float32) + 0.5
    dy = (grid[None, :, None] - cy[:, None, None]) / r  # [n, S, 1]
    dx = (grid[None, None, :] - cx[:, None, None]) / r  # [n, 1, S]
    square = (dy.abs() <= 0.85) & (dx.abs() <= 0.85)
    circle = dy ** 2 + dx ** 2 <= 1.0
    triangle = (dy >= -1.0) & (dy <= 0.8) & (dx.abs() <= (dy + 1.0) * 0.55)
    inside = torch.where((shape == 0)[:, None, None], square,
                         torch.where((shape == 1)[:, None, None], circle, triangle))  # [n, S, S]
    rgb = torch.tensor(list(COLOURS.values()))[colour]  # [n, 3]
    img = torch.full((n, 3, S, S), 0.1)
    if noise > 0:
        img = img + noise * torch.randn(n, 3, S, S, generator=g)
    img = torch.where(inside[:, None], rgb[:, :, None, None].expand(n, 3, S, S), img)
    return (img.clamp(0, 1) * 2 - 1).contiguous()


def _draw(n: int, g: torch.Generator):
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return (torch.randint(len(COLOURS), (n,), generator=g), torch.randint(len(SHAPES), (n,), generator=g),
            torch.randint(len(PLACES), (n,), generator=g))


@dataclasses.dataclass
class Pairs:
    images: torch.Tensor  # [n, 3, S, S] float32 in [-1, 1]
    tokens: torch.Tensor  # [n, L] int64 caption token ids
    concept: torch.Tensor  # [n] int64 concept id (see concept_of)
    colour: torch.Tensor
    shape: torch.Tensor
    place: torch.Tensor


def make_pairs(n: int, g: torch.Generator, *, image_size: int = 32, noise: float = 0.1,
               templates: bool = True, tok: Tokenizer = tokenizer) -> Pairs:
    """n image-caption pairs; ``templates=False`` uses the plain template "a {colour} {shape} in the {place}"."""
    colour, shape, place = _draw(n, g)
    images = render(colour, shape, place, g, image_size=image_size, noise=noise)
    which = torch.randint(len(_TEMPLATES), (n,), generator=g) if templates else torch.zeros(n, dtype=torch.int64)
    texts = [caption_of(int(c), int(s), int(p), int(t)) for c, s, p, t in zip(colour, shape, place, which)]
    return Pairs(images, tok(texts), concept_of(colour, shape, place), colour, shape, place)


def class_captions(tok: Tokenizer = tokenizer) -> torch.Tensor:
    """[NUM_CONCEPTS, L] token ids: the plain caption of every concept, row ``concept_of(c, s, p)``."""
    texts = [caption_of(c, s, p) for c in range(len(COLOURS)) for s in range(len(SHAPES)) for p in range(len(PLACES))]
    return tok(texts)


@dataclasses.dataclass
class QA:
    images: torch.Tensor  # [n, 3, S, S] float32 in [-1, 1]
    question: torch.Tensor  # [n, L] int64 token ids
    answer: torch.Tensor  # [n] int64 index into ANSWERS
    kind: torch.Tensor  # [n] int64 question type: 0 colour, 1 shape, 2 place, 3 yes/no


def make_vqa(n: int, g: torch.Generator, *, image_size: int = 32, noise: float = 0.1,
             tok: Tokenizer = tokenizer) -> QA:
    """n (image, question, answer) triples, a quarter of each kind:

    - colour: "what colour is the {shape} ?" -> the colour
    - shape: "what shape is in the {place} ?" -> the shape
    - place: "where is the {colour} {shape} ?" -> the place
    - yes / no: "is there a {colour} {shape} ?" -> yes (half the time) or no (a colour or shape that differs)

    The majority answer of each kind is right 1/4, 1/3, 1/4 and 1/2 of the time.
    """
    colour, shape, place = _draw(n, g)
    images = render(colour, shape, place, g, image_size=image_size, noise=noise)
    kind = torch.randint(4, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    other_c = (colour + torch.randint(1, len(COLOURS), (n,), generator=g)) % len(COLOURS)
    other_s = (shape + torch.randint(1, len(SHAPES), (n,), generator=g)) % len(SHAPES)
    change_colour = torch.rand(n, generator=g) < 0.5
    cn, qs, ans = list(COLOURS), [], []
    for i in range(n):
        c, s, p, k = cn[int(colour[i])], SHAPES[int(shape[i])], PLACES[int(place[i])], int(kind[i])
        if k == 0:
            qs.append(f"what colour is the {s} ?")
            ans.append(c)
        elif k == 1:
            qs.append(f"what shape is in the {p} ?")
            ans.append(s)
        elif k == 2:
            qs.append(f"where is the {c} {s} ?")
            ans.append(p)
        else:
            if bool(flip[i]):
                if bool(change_colour[i]):
                    c = cn[int(other_c[i])]
                else:
                    s = SHAPES[int(other_s[i])]
            qs.append(f"is there a {c} {s} ?")
            ans.append("no" if bool(flip[i]) else "yes")
    answer = torch.tensor([ANSWERS.index(a) for a in ans], dtype=torch.int64)
    return QA(images, tok(qs), answer, kind)
