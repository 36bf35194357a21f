"""shapes-eval: an analytic scorer for the shapes world (no learned weights; docs/shapes.md).

detect() segments an image by palette colour (each pixel goes to the palette colour whose blend
line with the background passes closest, within COLOR_TOL, and only past the line's midpoint: so
slightly off colours still count and blurred edges count as the colour they fade from), labels
4-connected components, drops specks and non-shapes, and classifies each component by how
bottom-heavy it is (an apex-up triangle's centroid lies 2/3 down its box) and by the fill ratio of
its box (square ~1, circle ~pi/4, triangle ~1/2), and its size by the box side. On top of it:
  * GenEval's six task types: geneval_prompts / scene_for_prompt / score / evaluate / format_table;
  * captioning and VQA: parse_caption, caption_correct, answer, normalize_answer;
  * region retrieval: region_boxes.
Command line: `shapes-eval --images DIR --prompts prompts.jsonl [--out result.json]`, or
`shapes-eval --write-prompts N OUT.jsonl [--render DIR]` to write (and render) a prompt set.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import re
import sys
from typing import Sequence

import numpy as np

from mmjax.data import shapes
from mmjax.data.shapes import COLORS, MAX_OBJECTS, NUMBER_WORDS, REL_PHRASES, SHAPES, SIZES, Scene
from mmjax.eval import artefacts
from mmjax.paths import resolve

TASKS = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')
COLOR_TOL = 80.0  # max RGB distance to a background-colour blend line (colours >= 120 apart)
MIN_AREA = 0.01  # components below this fraction of the image are specks
MIN_FILL = 0.3  # below this box fill ratio a component is no shape (thin strokes, rings)
MAX_ASPECT = 2.0  # shapes are drawn with square boxes
TRIANGLE_DROP = 0.58  # centroid depth in the box >= this: triangle (apex up: 2/3; others: 1/2)
SQUARE_FILL = 0.9  # else fill >= 0.9: square; raster circles fill 0.75-0.86 of their box
CIRCLE_FILL = 0.64  # else fill >= 0.64: circle, below: triangle (raster triangles fill ~0.51)
LARGE = 0.3  # box side / image side: small 0.22, large 0.375

_BG = shapes.BACKGROUND.astype(np.float32)
_DIRS = shapes.PALETTE.astype(np.float32) - _BG  # background -> palette colour
_DIRS_SQ = (_DIRS**2).sum(1)


@dataclasses.dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    box: tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the image side
    area: float  # fraction of the image


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal labels >= 0: each pixel gets the smallest flat index in its
    component (min-label propagation with pointer jumping; a few vectorised sweeps)."""
    h, w = cls.shape
    fg = cls >= 0
    big = h * w
    lab = np.where(fg, np.arange(big).reshape(h, w), big)
    same_x = fg[:, 1:] & (cls[:, 1:] == cls[:, :-1])
    same_y = fg[1:] & (cls[1:] == cls[:-1])
    while True:
        new = lab.copy()
        np.minimum(new[:, 1:], np.where(same_x, lab[:, :-1], big), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(same_x, lab[:, 1:], big), out=new[:, :-1])
        np.minimum(new[1:], np.where(same_y, lab[:-1], big), out=new[1:])
        np.minimum(new[:-1], np.where(same_y, lab[1:], big), out=new[:-1])
        flat = np.append(new.ravel(), big)  # labels point into their component; jump to roots
        for _ in range(3):
            flat = flat[flat]
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            return lab
        lab = new


def detect(image: np.ndarray) -> list[Detection]:
    """The shapes in a uint8 [H, W, 3] image, largest first (GenEval orders by confidence)."""
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f'expected an [H, W, 3] image, got shape {img.shape}')
    h, w = img.shape[:2]
    # Model each pixel as a blend bg + t * (colour - bg) (blurred or anti-aliased edges): take the
    # colour whose blend line passes closest; the pixel is that colour's when t >= 1/2.
    x = img.reshape(-1, 3).astype(np.float32) - _BG
    xd = x @ _DIRS.T  # [pixels, colours]
    t = np.clip(xd / _DIRS_SQ, 0, 1)
    d2 = (x * x).sum(1, keepdims=True) - 2 * t * xd + t * t * _DIRS_SQ  # to the blend line
    k = d2.argmin(1)
    rows = np.arange(len(k))
    fg = (t[rows, k] >= 0.5) & (d2[rows, k] <= COLOR_TOL**2)
    cls = np.where(fg, k, -1).reshape(h, w)
    lab = _components(cls)
    ys, xs = np.nonzero(cls >= 0)
    ids, inv, area = np.unique(lab[ys, xs], return_inverse=True, return_counts=True)
    x0 = np.full(len(ids), w)
    y0 = np.full(len(ids), h)
    x1 = np.full(len(ids), -1)
    y1 = np.full(len(ids), -1)
    np.minimum.at(x0, inv, xs)
    np.minimum.at(y0, inv, ys)
    np.maximum.at(x1, inv, xs + 1)
    np.maximum.at(y1, inv, ys + 1)
    mean_y = np.bincount(inv, weights=ys + 0.5) / area
    out = []
    for i, root in enumerate(ids):
        bw, bh = x1[i] - x0[i], y1[i] - y0[i]
        fill = area[i] / (bw * bh)
        if area[i] < MIN_AREA * h * w or fill < MIN_FILL or max(bw / bh, bh / bw) > MAX_ASPECT:
            continue
        drop = (mean_y[i] - y0[i]) / bh
        shape = (
            'triangle'
            if drop >= TRIANGLE_DROP
            else 'square'
            if fill >= SQUARE_FILL
            else 'circle'
            if fill >= CIRCLE_FILL
            else 'triangle'
        )
        size = 'large' if np.sqrt(bw * bh / (h * w)) >= LARGE else 'small'
        box = (x0[i] / w, y0[i] / h, x1[i] / w, y1[i] / h)
        out.append(
            Detection(shape, COLORS[cls.flat[root]], size, tuple(map(float, box)), float(area[i] / (h * w)))
        )
    return sorted(out, key=lambda d: -d.area)


def region_boxes(image: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Boxes of the detected objects (fractions), for region retrieval."""
    return [d.box for d in detect(image)]


def matches_scene(image: np.ndarray, scene: Scene) -> bool:
    """Whether the detected objects are exactly the scene's (shape, colour, size) multiset."""
    return collections.Counter((d.shape, d.color, d.size) for d in detect(image)) == collections.Counter(
        (o.shape, o.color, o.size) for o in scene.objects
    )


# ---------------------------------------------------------------------------------------------
# GenEval-style prompts and scoring. A spec mirrors GenEval's metadata: `include` requirements
# {shape, count[, color][, position: [relation, index of an earlier requirement]]} need at least
# `count` matches; `exclude` requirements {shape, count} fail at `count` or more.


@dataclasses.dataclass(frozen=True)
class Prompt:
    task: str
    text: str
    spec: dict


def _prompt(task: str, rng: np.random.Generator) -> Prompt:
    s1, s2 = (SHAPES[i] for i in rng.permutation(len(SHAPES))[:2])
    c1, c2 = (COLORS[i] for i in rng.permutation(len(COLORS))[:2])
    if task == 'single_object':
        return Prompt(task, f'a {s1}', {'include': [{'shape': s1, 'count': 1}]})
    if task == 'two_object':
        return Prompt(
            task, f'a {s1} and a {s2}', {'include': [{'shape': s1, 'count': 1}, {'shape': s2, 'count': 1}]}
        )
    if task == 'counting':
        n = int(rng.integers(2, MAX_OBJECTS + 1))
        return Prompt(
            task,
            f'{NUMBER_WORDS[n]} {s1}s',
            {'include': [{'shape': s1, 'count': n}], 'exclude': [{'shape': s1, 'count': n + 1}]},
        )
    if task == 'colors':
        return Prompt(task, f'a {c1} {s1}', {'include': [{'shape': s1, 'count': 1, 'color': c1}]})
    if task == 'position':
        rel = list(REL_PHRASES)[rng.integers(len(REL_PHRASES))]
        return Prompt(
            task,
            f'a {s2} {REL_PHRASES[rel]} a {s1}',
            {'include': [{'shape': s1, 'count': 1}, {'shape': s2, 'count': 1, 'position': [rel, 0]}]},
        )
    if task == 'color_attr':
        return Prompt(
            task,
            f'a {c1} {s1} and a {c2} {s2}',
            {'include': [{'shape': s1, 'count': 1, 'color': c1}, {'shape': s2, 'count': 1, 'color': c2}]},
        )
    raise ValueError(f'unknown task {task!r}; valid: {", ".join(TASKS)}')


def geneval_prompts(n_per_task: int, seed: int = 0) -> list[Prompt]:
    """n_per_task prompts for each of the six task types, in TASKS order."""
    rng = np.random.default_rng(seed)
    return [_prompt(task, rng) for task in TASKS for _ in range(n_per_task)]


def scene_for_prompt(prompt: Prompt, rng: np.random.Generator) -> Scene:
    """A ground-truth scene satisfying the prompt: exactly the required objects (unspecified
    colours and all sizes random) at random positions, any required relation holding alone."""
    groups, specs = [], []
    for req in prompt.spec['include']:
        groups.append(range(len(specs), len(specs) + req['count']))
        specs += [(req['shape'], req.get('color')) for _ in range(req['count'])]
    rels = [
        (groups[k], req['position'][0], groups[req['position'][1]])
        for k, req in enumerate(prompt.spec['include'])
        if 'position' in req
    ]

    def accept(sc):
        return all(
            shapes.relations(sc.objects[i].box, sc.objects[j].box) == {rel}
            for a, rel, b in rels
            for i in a
            for j in b
        )

    while True:
        objs = [
            (s, c or COLORS[rng.integers(len(COLORS))], SIZES[rng.integers(len(SIZES))]) for s, c in specs
        ]
        sc = shapes.layout(rng, objs, accept if rels else None)
        if sc is not None:
            return sc


class PromptSource:
    """GenEval prompts as a random-access source: record i is sample i % k of prompt i // k
    (`geneval_prompts(prompts_per_task, seed)`, k = samples_per_prompt), with its task, text, spec
    (JSON) and whether it names a held-out colour-shape pair."""

    def __init__(self, prompts_per_task: int = 8, samples_per_prompt: int = 4, seed: int = 0):
        self.prompts, self.k = geneval_prompts(prompts_per_task, seed), samples_per_prompt

    def __len__(self) -> int:
        return len(self.prompts) * self.k

    def __getitem__(self, i) -> dict:
        p = self.prompts[int(i) // self.k]
        pairs = {(r.get('color'), r['shape']) for r in p.spec['include']}
        return {
            'index': np.int64(i),
            'task': p.task,
            'text': p.text,
            'spec': json.dumps(p.spec),
            'held_out': bool(pairs & set(shapes.HELD_OUT)),
        }


class GenEval:
    """GenEval's protocol on the shapes world: per-task accuracy over every image, the overall
    unweighted mean of the six tasks, the held-out colour-shape prompts on their own, a grid."""

    def __init__(self, spec):
        self.source = PromptSource(
            spec.get("prompts_per_task", 8), spec.get("samples_per_prompt", 4)
        )

    def __call__(self, out: dict) -> dict:
        records = [self.source[int(i)] for i in out["index"]]
        prompts = [Prompt(r["task"], r["text"], json.loads(r["spec"])) for r in records]
        result = evaluate(list(out["image"]), prompts)
        held = [i for i, r in enumerate(records) if r["held_out"]]
        if held:
            result["held_out"] = evaluate(
                [out["image"][i] for i in held], [prompts[i] for i in held]
            )["overall"]
        result = {k: v for k, v in result.items() if k != "num_images"}
        n = min(len(records), 32)
        result["samples"] = artefacts.Images(
            out["image"][:n], tuple(r["text"] for r in records[:n]), columns=8
        )
        return result


def edit_score(image: np.ndarray, source: Scene, target: Scene) -> tuple[bool, bool]:
    """(success, preservation) of an edit of `source` asked to become `target`: every (shape,
    colour, size) the edit brings is found and what it takes away is gone; every object both
    scenes share is still there."""
    found = collections.Counter((d.shape, d.color, d.size) for d in detect(image))
    src, tgt = (collections.Counter((o.shape, o.color, o.size) for o in s.objects) for s in (source, target))
    success = all(found[k] >= n for k, n in (tgt - src).items()) and all(
        found[k] <= tgt[k] for k in (src - tgt)
    )
    return success, all(found[k] >= n for k, n in (src & tgt).items())


def _check(dets: Sequence[Detection], spec: dict) -> bool:
    """GenEval's rule: per requirement take the `count` most confident (largest) objects of the
    shape, then check their colour and their position relative to an earlier group."""
    groups = []
    for req in spec.get('include', []):
        found = [d for d in dets if d.shape == req['shape']][: req['count']]
        if len(found) < req['count'] or any(req.get('color', d.color) != d.color for d in found):
            return False
        if 'position' in req:
            rel, j = req['position']
            if any(rel not in shapes.relations(d.box, t.box) for d in found for t in groups[j]):
                return False
        groups.append(found)
    return all(
        sum(d.shape == r['shape'] and r.get('color', d.color) == d.color for d in dets) < r['count']
        for r in spec.get('exclude', [])
    )


def score(image: np.ndarray, prompt: Prompt) -> bool:
    """Whether the image shows what the prompt asks for."""
    return _check(detect(image), prompt.spec)


def _summary(tasks: Sequence[str], correct: Sequence[bool]) -> dict:
    hits = collections.defaultdict(list)
    for task, ok in zip(tasks, correct, strict=True):
        hits[task].append(ok)
    result = {t: float(np.mean(hits[t])) for t in TASKS if hits[t]}
    result['overall'] = float(np.mean(list(result.values()))) if result else 0.0
    result['num_images'] = len(correct)
    return result


def evaluate(images, prompts: Sequence[Prompt]) -> dict:
    """Per-task accuracy, `overall` (the mean over the task types present) and `num_images`."""
    return _summary([p.task for p in prompts], [score(im, p) for im, p in zip(images, prompts, strict=True)])


_HEADERS = {
    'overall': 'Overall',
    'single_object': 'Single obj.',
    'two_object': 'Two obj.',
    'counting': 'Counting',
    'colors': 'Colors',
    'position': 'Position',
    'color_attr': 'Color attr.',
}


def format_table(result: dict) -> str:
    """GenEval's table: one header row, one row of scores."""
    keys = [k for k in _HEADERS if k in result]
    return '\n'.join(
        [
            '| ' + ' | '.join(_HEADERS[k] for k in keys) + ' |',
            '|' + '|'.join('---:' for _ in keys) + '|',
            '| ' + ' | '.join(f'{result[k]:.3f}' for k in keys) + ' |',
        ]
    )


# ---------------------------------------------------------------------------------------------
# Captioning and VQA.

_NUMBERS = {'a': 1, 'an': 1, 'one': 1, 'two': 2, 'three': 3, 'four': 4}
_C, _S = '|'.join(COLORS), '|'.join(SHAPES)
_MENTION = re.compile(
    rf'\b(a|an|one|two|three|four)\s+(?:(small|large)\s+)?(?:({_C})\s+)?'
    rf'({_S})s?\b'
)
_RELATION_WORDS = {v: k for k, v in REL_PHRASES.items()}


def _mentions(text: str) -> list[re.Match]:
    return list(_MENTION.finditer(text.lower()))


def parse_caption(text: str) -> collections.Counter:
    """Object mentions as {(colour or None, shape): count}: 'two green triangles and a circle' ->
    {('green', 'triangle'): 2, (None, 'circle'): 1}."""
    out = collections.Counter()
    for m in _mentions(text):
        out[m[3], m[4]] += _NUMBERS[m[1]]
    return out


def caption_correct(text: str, scene: Scene, complete: bool = False) -> bool:
    """Whether everything the caption says is true of the scene: counts are exact per mentioned
    (colour, shape) group (per shape for colourless mentions), sizes hold, and each 'X <relation> Y'
    holds for some X and Y. complete=True also requires every object to be mentioned. A caption
    without any object mention is not correct."""
    ms = _mentions(text)
    if not ms:
        return False
    count = lambda **kw: len(shapes.select(scene, **kw))  # noqa: E731
    for shape in SHAPES:
        mine = [(_NUMBERS[m[1]], m[2], m[3]) for m in ms if m[4] == shape]
        free = sum(n for n, _, c in mine if c is None)
        colored, sized = collections.Counter(), collections.Counter()
        for n, z, c in mine:
            if c:
                colored[c] += n
            if z:
                sized[c, z] += n
        if free:
            ok = all(n <= count(shape=shape, color=c) for c, n in colored.items()) and free + sum(
                colored.values()
            ) == count(shape=shape)
        else:
            ok = all(n == count(shape=shape, color=c) for c, n in colored.items()) and (
                not complete or sum(colored.values()) == count(shape=shape)
            )
        if not ok or any(n > count(shape=shape, color=c, size=z) for (c, z), n in sized.items()):
            return False
    for a, b in zip(ms, ms[1:]):
        rel = _RELATION_WORDS.get(text.lower()[a.end() : b.start()].strip())
        if rel and not any(
            rel in shapes.relations(x.box, y.box)
            for x in shapes.select(scene, a[4], a[3], a[2])
            for y in shapes.select(scene, b[4], b[3], b[2])
        ):
            return False
    return True


_REF = rf'(?:(small|large) )?(?:({_C}) )?({_S}|object|shape)'
_QUESTIONS = [
    (kind, re.compile(pattern))
    for kind, pattern in (
        ('color', rf'what colou?r is the {_REF}'),
        ('shape', rf'what shape is the {_REF}'),
        ('size', rf'what size is the {_REF}'),
        ('size', rf'is the {_REF} small or large'),
        ('count', rf'how many {_REF}s are there'),
        ('exists', rf'is there an? {_REF}'),
        ('is_color', rf'is the {_REF} ({_C})'),
        ('horizontal', rf'is the {_REF} to the left or to the right of the {_REF}'),
        ('vertical', rf'is the {_REF} above or below the {_REF}'),
    )
]


def _select(scene: Scene, size, color, noun):
    return shapes.select(scene, None if noun in ('object', 'shape') else noun, color, size)


def _the(scene: Scene, size, color, noun):
    found = _select(scene, size, color, noun)
    if len(found) != 1:
        words = ' '.join(w for w in (size, color, noun) if w)
        raise ValueError(f"'the {words}' matches {len(found)} objects, not one")
    return found[0]


def _parse(question: str) -> tuple[str, tuple]:
    q = ' '.join(question.lower().strip().rstrip('?').split())
    for kind, pattern in _QUESTIONS:
        m = pattern.fullmatch(q)
        if m:
            return kind, m.groups()
    raise ValueError(f'not a shapes-world question: {question!r}')


def question_kind(question: str) -> str:
    """color, shape, size, count, exists, is_color, horizontal or vertical."""
    return _parse(question)[0]


def answer(scene: Scene, question: str) -> str:
    """The exact answer to a template question (the QA view's), in canonical form."""
    kind, g = _parse(question)
    if kind in ('color', 'shape', 'size'):
        return getattr(_the(scene, *g), kind)
    if kind == 'count':
        return NUMBER_WORDS[len(_select(scene, *g))]
    if kind == 'exists':
        return 'yes' if _select(scene, *g) else 'no'
    if kind == 'is_color':
        return 'yes' if _the(scene, *g[:3]).color == g[3] else 'no'
    (ax, ay), (bx, by) = _the(scene, *g[:3]).center, _the(scene, *g[3:]).center
    if kind == 'horizontal':
        return 'left' if ax < bx else 'right'
    return 'above' if ay < by else 'below'


_DIGITS = {str(i): w for i, w in enumerate(NUMBER_WORDS)}


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, digits as number words: ' Two.' -> 'two'."""
    words = re.sub(r'[^\w\s]', ' ', text.lower()).split()
    return ' '.join(_DIGITS.get(w, w) for w in words if w not in ('a', 'an', 'the'))


# ---------------------------------------------------------------------------------------------
# Command line.


def main(argv: Sequence[str] | None = None) -> int:
    from PIL import Image  # pylint: disable=import-outside-toplevel

    ap = argparse.ArgumentParser(
        prog='shapes-eval',
        description='Score images against shapes-world prompts on GenEval\'s '
        'six task types, or write a prompt set.',
    )
    ap.add_argument('--images', type=resolve, help='folder with the files the prompts name')
    ap.add_argument('--prompts', type=resolve, help='JSONL, one {"file", "task", "text", "spec"} per line')
    ap.add_argument('--out', type=resolve, help='write the result (and per-image scores) here')
    ap.add_argument(
        '--write-prompts',
        nargs=2,
        metavar=('N', 'OUT'),
        help='write N prompts per task to OUT (JSONL) and exit',
    )
    ap.add_argument(
        '--render',
        type=resolve,
        metavar='DIR',
        help='with --write-prompts: also render a ground-truth image per prompt to DIR',
    )
    ap.add_argument('--image-size', type=int, default=32, help='size of --render images')
    ap.add_argument('--seed', type=int, default=0)
    args = ap.parse_args(argv)

    if args.write_prompts:
        n, out = args.write_prompts
        if not n.isdigit():
            ap.error(f'--write-prompts: N must be a non-negative integer, got {n!r}')
        prompts = geneval_prompts(int(n), args.seed)
        rng = np.random.default_rng(args.seed)
        if args.render:
            args.render.mkdir(parents=True, exist_ok=True)
        lines = []
        for i, p in enumerate(prompts):
            rec = {'file': f'{i:05d}.png', **dataclasses.asdict(p)}
            lines.append(json.dumps(rec))
            if args.render:
                with (args.render / rec['file']).open('wb') as f:
                    Image.fromarray(shapes.render(scene_for_prompt(p, rng), args.image_size)).save(
                        f, format='PNG'
                    )
        out = resolve(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text('\n'.join(lines) + '\n')
        print(
            f'wrote {len(prompts)} prompts to {out}' + (f', images to {args.render}' if args.render else '')
        )
        return 0

    if args.images is None or args.prompts is None:
        ap.error('give --images DIR and --prompts FILE (or --write-prompts N OUT)')
    if not args.prompts.is_file():
        ap.error(f'prompts file not found: {args.prompts}')
    if not args.images.is_dir():
        ap.error(f'images folder not found: {args.images}')
    records = []
    for line_no, line in enumerate(args.prompts.read_text().splitlines(), 1):
        if line.strip():
            try:
                rec = json.loads(line)
                records.append((rec['file'], Prompt(rec['task'], rec['text'], rec['spec'])))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                ap.error(f'{args.prompts}:{line_no}: not a prompt record ({e!r})')
            if rec['task'] not in TASKS:
                ap.error(f'{args.prompts}:{line_no}: unknown task {rec["task"]!r}; valid: {TASKS}')
    missing = [f for f, _ in records if not (args.images / f).is_file()]
    if missing:
        ap.error(f'{len(missing)} image(s) missing from {args.images}, e.g. {missing[0]}')
    correct = []
    for f, p in records:
        with (args.images / f).open('rb') as fh:
            correct.append(score(np.asarray(Image.open(fh).convert('RGB')), p))
    result = _summary([p.task for _, p in records], correct)
    print(format_table(result))
    if args.out:
        per_image = [{'file': f, 'task': p.task, 'correct': ok} for (f, p), ok in zip(records, correct)]
        args.out.write_text(json.dumps({**result, 'per_image': per_image}, indent=2) + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
