"""The shapes world: mmjax's embedded, procedurally generated multimodal data (docs/shapes.md).

A scene is 1..MAX_OBJECTS coloured shapes on a plain background. The scene, its rendering and
every text about it are pure functions of (split, index, seed), so a record is the same on any
machine and with any number of data workers.

Layout: boxes lie on a GRID x GRID lattice (fractions k/GRID of the image side), GAP cells apart
and one cell from the border, so renders at 32 and 64 px are pixel-exact and every object is its
own connected component.

Splits: a hash of a scene's content assigns it to one split (train 80%, val 10%, test 10% of the
scene space) and each split samples only its own scenes, so by construction no scene (hence no
image) occurs in two splits. The HELD_OUT colour-shape pairs never occur in train or val, in any
view (image-only data included: the pairs are unseen in training altogether); in test every 4th
scene holds one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
from typing import Callable, Sequence

import numpy as np

SHAPES = ('circle', 'square', 'triangle')
COLORS = ('red', 'green', 'blue', 'yellow', 'purple', 'cyan')
# Saturated, pairwise >= 120 apart in RGB (closest: blue-cyan), all >= 197 from BACKGROUND.
PALETTE = np.array(
    [(220, 40, 40), (40, 170, 60), (40, 80, 220), (240, 210, 40), (160, 40, 180), (40, 200, 210)], np.uint8
)
BACKGROUND = np.array((235, 235, 235), np.uint8)
SIZES = ('small', 'large')
MAX_OBJECTS = 4
SPLITS = ('train', 'val', 'test')
VIEWS = ('image', 'caption', 'qa', 'region', 'edit', 'interleaved', 'text')
DEFAULT_RECORDS = {'train': 1_000_000, 'val': 2_000, 'test': 2_000}
HELD_OUT = (('red', 'triangle'), ('blue', 'circle'))
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four')
REL_PHRASES = {'left of': 'to the left of', 'right of': 'to the right of', 'above': 'above', 'below': 'below'}
GRID = 32  # layout lattice: boxes are multiples of 1/GRID
SIDE = {'small': 7, 'large': 12}  # object side in grid cells (7 and 12 px at 32 px)
GAP = 2  # minimum gap between boxes, in grid cells
_SPLIT_IDS = {'train': 0, 'val': 1, 'test': 2}
_HELD_OUT_EVERY = 4  # test scenes with index % 4 == 0 hold a HELD_OUT pair


@dataclasses.dataclass(frozen=True)
class Object:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1) as fractions of the image side

    @property
    def center(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[Object, ...]


def _check(value, choices, what):
    if value not in choices:
        raise ValueError(f'unknown {what} {value!r}; valid: {", ".join(choices)}')


def select(scene: Scene, shape=None, color=None, size=None) -> list[Object]:
    """The scene's objects with the given attributes (None matches anything)."""
    return [
        o
        for o in scene.objects
        if shape in (None, o.shape) and color in (None, o.color) and size in (None, o.size)
    ]


def has_held_out(scene: Scene) -> bool:
    return any((o.color, o.shape) in HELD_OUT for o in scene.objects)


def relations(a, b) -> set[str]:
    """GenEval's relative position of box a to box b: a subset of left of, right of, above, below."""
    boxes = np.array([a, b], np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - 0.1 * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    return {
        r
        for r, on in (
            ('left of', dx < -0.5),
            ('right of', dx > 0.5),
            ('above', dy < -0.5),
            ('below', dy > 0.5),
        )
        if on
    }


# ---------------------------------------------------------------------------------------------
# Layout and sampling.


def _cells(box) -> tuple[int, ...]:
    return tuple(round(v * GRID) for v in box)


def _clash(a, b) -> bool:
    """Whether grid boxes a and b come closer than GAP cells."""
    return a[0] < b[2] + GAP and a[2] > b[0] - GAP and a[1] < b[3] + GAP and a[3] > b[1] - GAP


def _free_positions(side: int, placed) -> tuple[np.ndarray, np.ndarray]:
    """All top-left corners (x0, y0) where a side-cell box fits clear of `placed` and the border."""
    r = np.arange(1, GRID - side)
    x0, y0 = r[None, :], r[:, None]
    ok = np.ones((len(r), len(r)), bool)
    for a0, b0, a1, b1 in placed:
        ok &= ~((x0 < a1 + GAP) & (x0 + side > a0 - GAP) & (y0 < b1 + GAP) & (y0 + side > b0 - GAP))
    ys, xs = np.nonzero(ok)
    return r[xs], r[ys]


def layout(
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str, str]],
    accept: Callable[[Scene], bool] | None = None,
    attempts: int = 20,
) -> Scene | None:
    """Places (shape, colour, size) objects, in order, at random free positions; None if no try
    within `attempts` fits them all and satisfies `accept`."""
    for _ in range(attempts):
        placed = []
        for _, _, size in specs:
            xs, ys = _free_positions(SIDE[size], placed)
            if not len(xs):
                break
            k = rng.integers(len(xs))
            x0, y0 = int(xs[k]), int(ys[k])
            placed.append((x0, y0, x0 + SIDE[size], y0 + SIDE[size]))
        else:
            sc = Scene(
                tuple(Object(s, c, z, tuple(v / GRID for v in b)) for (s, c, z), b in zip(specs, placed))
            )
            if accept is None or accept(sc):
                return sc
    return None


def _split_of(sc: Scene) -> str:
    """The split a scene belongs to, by a stable hash of its content (80/10/10)."""
    key = repr(sorted((o.shape, o.color, o.size, _cells(o.box)) for o in sc.objects))
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), 'little') % 10
    return 'train' if bucket < 8 else 'val' if bucket == 8 else 'test'


def _sample_scene(rng: np.random.Generator, split: str, force_held_out: bool = False) -> Scene:
    while True:
        n = int(rng.integers(1, MAX_OBJECTS + 1))
        specs = [
            (
                SHAPES[rng.integers(len(SHAPES))],
                COLORS[rng.integers(len(COLORS))],
                SIZES[rng.integers(len(SIZES))],
            )
            for _ in range(n)
        ]
        if force_held_out:
            color, shape = HELD_OUT[rng.integers(len(HELD_OUT))]
            specs[0] = (shape, color, specs[0][2])
        if split != 'test' and any((c, s) in HELD_OUT for s, c, _ in specs):
            continue
        sc = layout(rng, specs, attempts=1)
        if sc is not None and _split_of(sc) == split:
            # Canonical order: top to bottom, then left to right.
            return Scene(tuple(sorted(sc.objects, key=lambda o: (o.box[1], o.box[0]))))


def _rng(seed: int, split: str, index: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split], index, *stream]))


def scene(split: str, index: int, seed: int = 0) -> Scene:
    """The scene of record `index` of `split`: a pure function of (split, index, seed)."""
    _check(split, SPLITS, 'split')
    return _sample_scene(
        _rng(seed, split, index), split, force_held_out=split == 'test' and index % _HELD_OUT_EVERY == 0
    )


def render(sc: Scene, image_size: int = 32) -> np.ndarray:
    """uint8 [S, S, 3]: crisp palette colours on BACKGROUND, no anti-aliasing (pixel centres)."""
    if image_size < 32:
        raise ValueError(f'image_size must be >= 32, got {image_size}')
    s = image_size
    img = np.empty((s, s, 3), np.uint8)
    img[:] = BACKGROUND
    for o in sc.objects:
        x0, y0, x1, y1 = (round(v * s) for v in o.box)
        w, h = x1 - x0, y1 - y0
        py, px = np.mgrid[y0:y1, x0:x1] + 0.5
        dx, dy = px - (x0 + x1) / 2, py - (y0 + y1) / 2
        if o.shape == 'circle':
            mask = (dx * h) ** 2 + (dy * w) ** 2 <= (w * h / 2) ** 2
        elif o.shape == 'triangle':  # apex up; at least 1 px wide at the top row
            mask = np.abs(dx) <= np.maximum((py - y0) / h * w / 2, 0.5)
        else:
            mask = np.ones((h, w), bool)
        img[y0:y1, x0:x1][mask] = PALETTE[COLORS.index(o.color)]
    return img


def scene_arrays(sc: Scene, prefix: str = '') -> dict[str, np.ndarray]:
    """The scene as fixed-size arrays (indices into SHAPES/COLORS/SIZES, -1 / 0 padding)."""
    n = len(sc.objects)
    pad = MAX_OBJECTS - n
    return {
        prefix + 'num_objects': np.int32(n),
        prefix + 'obj_shape': np.array([SHAPES.index(o.shape) for o in sc.objects] + [-1] * pad, np.int32),
        prefix + 'obj_color': np.array([COLORS.index(o.color) for o in sc.objects] + [-1] * pad, np.int32),
        prefix + 'obj_size': np.array([SIZES.index(o.size) for o in sc.objects] + [-1] * pad, np.int32),
        prefix + 'obj_box': np.array([o.box for o in sc.objects] + [(0.0,) * 4] * pad, np.float32).reshape(
            MAX_OBJECTS, 4
        ),
    }


def scene_from_arrays(num_objects, obj_shape, obj_color, obj_size, obj_box) -> Scene:
    """Inverse of scene_arrays."""
    return Scene(
        tuple(
            Object(
                SHAPES[int(obj_shape[i])],
                COLORS[int(obj_color[i])],
                SIZES[int(obj_size[i])],
                tuple(float(v) for v in obj_box[i]),
            )
            for i in range(int(num_objects))
        )
    )


# ---------------------------------------------------------------------------------------------
# Text. Every generator takes the record's rng; `allowed(color, shape)` vetoes colour-shape
# pairs that the text may not name (HELD_OUT outside the test split).


def _any(color, shape):
    return True


def _pick(rng, seq):
    return seq[rng.integers(len(seq))]


def _phrase(n: int, shape: str, color=None, size=None) -> str:
    """'a red circle', 'two small green triangles', 'three squares'."""
    words = ('a' if n == 1 else NUMBER_WORDS[n], size, color, shape + ('s' if n > 1 else ''))
    return ' '.join(w for w in words if w)


def _refs(sc: Scene, o: Object, attrs=('size', 'color', 'shape')) -> list[str]:
    """Referring expressions built from `attrs` that pick out `o` alone: 'circle', 'red object'."""
    out = []
    for use in itertools.product(
        *((False, True) if a in attrs else (False,) for a in ('size', 'color', 'shape'))
    ):
        size, color, shape = (v if u else None for v, u in zip((o.size, o.color, o.shape), use))
        if len(select(sc, shape, color, size)) == 1:
            out.append(' '.join(w for w in (size, color, shape or 'object') if w))
    return out


_PREFIXES = ('', '', 'an image of ', 'a picture of ', 'a scene with ', 'there is ')


def caption(sc: Scene, rng: np.random.Generator) -> str:
    """A true description: every (colour, shape) group with its exact count ('two green triangles
    and a red circle'), the same by shape only ('three circles'), or one spatial relation between
    two objects that their words pick out alone ('a red circle to the left of a blue square')."""
    objs = sc.objects
    uniq = lambda o, color: len(select(sc, o.shape, color)) == 1  # noqa: E731
    pairs = [
        (a, b, rel)
        for a in objs
        for b in objs
        if a is not b and uniq(a, a.color) and uniq(b, b.color)
        for rel in [relations(a.box, b.box)]
        if len(rel) == 1
    ]
    mode = _pick(
        rng, ('list', 'list', 'shapes', 'relation', 'relation') if pairs else ('list', 'list', 'shapes')
    )
    if mode == 'relation':
        a, b, rel = _pick(rng, pairs)
        colorless = uniq(a, None) and uniq(b, None) and rng.random() < 0.3
        words = [
            _phrase(1, o.shape, None if colorless else o.color, o.size if rng.random() < 0.3 else None)
            for o in (a, b)
        ]
        body = f'{words[0]} {REL_PHRASES[next(iter(rel))]} {words[1]}'
    else:
        groups = {}
        for o in objs:
            groups.setdefault((o.color if mode == 'list' else None, o.shape), []).append(o)
        items = list(groups.items())
        phrases = []
        for k in rng.permutation(len(items)):
            (color, shape), members = items[k]
            same_size = len({o.size for o in members}) == 1 and rng.random() < 0.4
            phrases.append(_phrase(len(members), shape, color, members[0].size if same_size else None))
        body = phrases[0] if len(phrases) == 1 else ', '.join(phrases[:-1]) + ' and ' + phrases[-1]
    prefix = _pick(rng, _PREFIXES)
    if prefix == 'there is ' and not body.startswith('a '):
        prefix = 'there are '
    return prefix + body


def qa(sc: Scene, rng: np.random.Generator, allowed=_any) -> tuple[str, str]:
    """A (question, answer) pair with a short canonical answer: a colour, shape or size name, a
    number word, 'yes'/'no', 'left'/'right' or 'above'/'below'."""
    objs = sc.objects
    colour = _pick(rng, ('colour', 'color'))

    def attribute():
        o, attr = _pick(rng, objs), _pick(rng, ('color', 'shape', 'size'))
        refs = _refs(sc, o, [a for a in ('size', 'color', 'shape') if a != attr])
        if not refs:
            return None
        ref = _pick(rng, refs)
        question = {
            'color': f'what {colour} is the {ref}?',
            'shape': f'what shape is the {ref}?',
            'size': _pick(rng, (f'what size is the {ref}?', f'is the {ref} small or large?')),
        }
        return question[attr], getattr(o, attr)

    def is_color():
        o = _pick(rng, objs)
        refs = _refs(sc, o, ('size', 'shape'))
        color = o.color if rng.random() < 0.5 else _pick(rng, COLORS)
        if not refs or not allowed(color, o.shape):
            return None
        return f'is the {_pick(rng, refs)} {color}?', 'yes' if color == o.color else 'no'

    def count():
        o = _pick(rng, objs)
        shape, color = (o.shape, o.color) if rng.random() < 0.7 else (_pick(rng, SHAPES), _pick(rng, COLORS))
        shape, color = _pick(rng, ((shape, None), (None, color), (shape, color), (None, None)))
        if shape and color and not allowed(color, shape):
            return None
        noun = shape + 's' if shape else _pick(rng, ('objects', 'shapes'))
        question = f'how many {color + " " if color else ""}{noun} are there?'
        return question, NUMBER_WORDS[len(select(sc, shape, color))]

    def exists():
        o = _pick(rng, objs)
        shape, color, size = (
            (o.shape, o.color, o.size)
            if rng.random() < 0.5
            else (_pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES))
        )
        size = size if rng.random() < 0.3 else None
        if not allowed(color, shape):
            return None
        return f'is there {_phrase(1, shape, color, size)}?', 'yes' if select(
            sc, shape, color, size
        ) else 'no'

    def where():
        if len(objs) < 2:
            return None
        a, b = (objs[i] for i in rng.permutation(len(objs))[:2])
        refs_a, refs_b, rel = _refs(sc, a), _refs(sc, b), relations(a.box, b.box)
        if not refs_a or not refs_b:
            return None
        ra, rb = _pick(rng, refs_a), _pick(rng, refs_b)
        options = [
            (f'is the {ra} to the left or to the right of the {rb}?', r.split()[0])
            for r in rel & {'left of', 'right of'}
        ]
        options += [(f'is the {ra} above or below the {rb}?', r) for r in rel & {'above', 'below'}]
        return _pick(rng, options) if options else None

    kinds, weights = (attribute, is_color, count, exists, where), (0.35, 0.1, 0.2, 0.15, 0.2)
    while True:
        result = kinds[rng.choice(len(kinds), p=weights)]()
        if result:
            return result


def region_caption(o: Object) -> str:
    return _phrase(1, o.shape, o.color, o.size)


def edit(sc: Scene, rng: np.random.Generator, allowed=_any) -> tuple[str, Scene]:
    """An edit instruction ('make the circle green') and the scene it asks for."""
    objs = list(sc.objects)
    colour = _pick(rng, ('colour', 'color'))

    def target(i, **changes):
        return Scene(tuple(dataclasses.replace(o, **changes) if j == i else o for j, o in enumerate(objs)))

    def one():  # an object that a referring expression picks out alone
        i = int(rng.integers(len(objs)))
        refs = _refs(sc, objs[i])
        return (i, objs[i], _pick(rng, refs)) if refs else (None, None, None)

    def recolor():
        i, o, ref = one()
        if ref is None:
            return None
        c = _pick(rng, [c for c in COLORS if c != o.color])
        text = _pick(
            rng, (f'make the {ref} {c}', f'change the {colour} of the {ref} to {c}', f'paint the {ref} {c}')
        )
        return text, target(i, color=c)

    def reshape():
        i, o, ref = one()
        if ref is None:
            return None
        s = _pick(rng, [s for s in SHAPES if s != o.shape])
        text = _pick(
            rng, (f'turn the {ref} into a {s}', f'change the {ref} into a {s}', f'make the {ref} a {s}')
        )
        return text, target(i, shape=s)

    def resize():
        i, o, ref = one()
        if ref is None:
            return None
        size = 'large' if o.size == 'small' else 'small'
        c = _cells(o.box)
        side = SIDE[size]
        x0, y0 = (c[0] + c[2] - side) // 2, (c[1] + c[3] - side) // 2
        box = (x0, y0, x0 + side, y0 + side)
        if (
            min(box) < 1
            or max(box) > GRID - 1
            or any(_clash(box, _cells(p.box)) for j, p in enumerate(objs) if j != i)
        ):
            return None
        text = _pick(
            rng,
            (f'make the {ref} {size}', f'make the {ref} bigger', f'enlarge the {ref}')
            if size == 'large'
            else (f'make the {ref} {size}', f'make the {ref} smaller', f'shrink the {ref}'),
        )
        return text, target(i, size=size, box=tuple(v / GRID for v in box))

    def remove():
        i, _, ref = one()
        if ref is None or len(objs) < 2:
            return None
        text = _pick(rng, (f'remove the {ref}', f'delete the {ref}', f'take away the {ref}'))
        return text, Scene(tuple(o for j, o in enumerate(objs) if j != i))

    def add():
        s, c, z = _pick(rng, SHAPES), _pick(rng, COLORS), _pick(rng, SIZES)
        xs, ys = _free_positions(SIDE[z], [_cells(o.box) for o in objs])
        if len(objs) >= MAX_OBJECTS or not len(xs):
            return None
        k = rng.integers(len(xs))
        box = tuple(float(v) / GRID for v in (xs[k], ys[k], xs[k] + SIDE[z], ys[k] + SIDE[z]))
        text = _pick(rng, (f'add {_phrase(1, s, c, z)}', f'add {_phrase(1, s, c)}'))
        return text, Scene(tuple(objs) + (Object(s, c, z, box),))

    def recolor_all():  # always possible: needs no unique referent
        s = _pick(rng, objs).shape
        c = _pick(
            rng, [c for c in COLORS if allowed(c, s) and any(o.color != c for o in select(sc, shape=s))]
        )
        text = _pick(rng, (f'make all the {s}s {c}', f'paint every {s} {c}'))
        return text, Scene(tuple(dataclasses.replace(o, color=c) if o.shape == s else o for o in objs))

    kinds = (recolor, reshape, resize, remove, add, recolor_all)
    for k in rng.permutation(len(kinds)):
        result = kinds[k]()
        if result and all(allowed(o.color, o.shape) for o in result[1].objects):
            return result
    raise AssertionError('recolor_all always succeeds')


def _sentence(text: str) -> str:
    return text[0].upper() + text[1:] + ('' if text.endswith('?') else '.')


def paragraph(scenes: Sequence[Scene], rng: np.random.Generator, allowed=_any) -> str:
    """Text-only document: a caption per scene, some followed by a question and its answer."""
    parts = []
    for sc in scenes:
        parts.append(_sentence(caption(sc, rng)))
        if rng.random() < 0.5:
            question, answer = qa(sc, rng, allowed)
            parts += [_sentence(question), _sentence(answer)]
    return ' '.join(parts)


# ---------------------------------------------------------------------------------------------
# Grain source.


class ShapesSource:
    """Random-access (grain) source of shapes-world records: flat dicts of numpy values / str.

    Views: 'image' (image + ground-truth arrays), 'caption' (+ text), 'qa' (+ question, answer),
    'region' (+ box, text), 'edit' (+ instruction, target_image, target_* arrays), 'interleaved'
    (images [K,S,S,3], texts: K captions), 'text' (text). Every record has index and split.
    """

    def __init__(
        self,
        split: str = 'train',
        view: str = 'image',
        image_size: int = 32,
        num_records: int | None = None,
        seed: int = 0,
        images_per_doc: int = 3,
    ):
        _check(split, SPLITS, 'split')
        _check(view, VIEWS, 'view')
        if image_size < 32:
            raise ValueError(f'image_size must be >= 32, got {image_size}')
        self.split, self.view, self.image_size = split, view, image_size
        self.num_records = DEFAULT_RECORDS[split] if num_records is None else int(num_records)
        self.seed, self.images_per_doc = seed, images_per_doc

    def __len__(self) -> int:
        return self.num_records

    def _allowed(self, color: str, shape: str) -> bool:
        return self.split == 'test' or (color, shape) not in HELD_OUT

    def __repr__(self) -> str:
        return (
            f'ShapesSource(split={self.split!r}, view={self.view!r}, '
            f'image_size={self.image_size}, num_records={self.num_records}, seed={self.seed}, '
            f'images_per_doc={self.images_per_doc})'
        )

    def __getitem__(self, idx) -> dict:
        idx = int(idx)
        if not 0 <= idx < self.num_records:
            raise IndexError(f'record {idx} out of range for {self!r}')
        rec = {'index': np.int64(idx), 'split': self.split}
        # the text stream; scenes use their own streams, so the image view needs none
        rng = _rng(self.seed, self.split, idx, 1) if self.view != 'image' else None
        if self.view in ('interleaved', 'text'):
            extra = _rng(self.seed, self.split, idx, 2)
            k = self.images_per_doc if self.view == 'interleaved' else int(rng.integers(2, 5))
            scenes = [scene(self.split, idx, self.seed)] + [
                _sample_scene(extra, self.split) for _ in range(k - 1)
            ]
            if self.view == 'text':
                rec['text'] = paragraph(scenes, rng, self._allowed)
            else:
                rec['images'] = np.stack([render(s, self.image_size) for s in scenes])
                rec['texts'] = tuple(caption(s, rng) for s in scenes)
            return rec
        sc = scene(self.split, idx, self.seed)
        rec['image'] = render(sc, self.image_size)
        rec.update(scene_arrays(sc))
        if self.view == 'caption':
            rec['text'] = caption(sc, rng)
        elif self.view == 'qa':
            rec['question'], rec['answer'] = qa(sc, rng, self._allowed)
        elif self.view == 'region':
            o = _pick(rng, sc.objects)
            rec['box'] = np.array(o.box, np.float32)
            rec['text'] = region_caption(o)
        elif self.view == 'edit':
            rec['instruction'], tgt = edit(sc, rng, self._allowed)
            rec['target_image'] = render(tgt, self.image_size)
            rec.update(scene_arrays(tgt, 'target_'))
        return rec
