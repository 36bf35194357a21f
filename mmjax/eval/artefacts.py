"""What an evaluation may return besides float scalars: images and generated texts.

An evaluator's results are ``{name: float | Images | Texts}``. ``MetricWriter.write_eval``
(mmjax/train/metrics.py) logs the floats like training scalars and writes each artefact to
``WORKDIR/eval/step_N/<name>.png`` (a captioned grid, see `grid`) or ``.jsonl`` (one row per
example), and to TensorBoard / Weights & Biases when those are on.

numpy and PIL only (no jax), so evaluators, notebooks and scripts can build these anywhere.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Mapping, Sequence

import numpy as np

SEPARATOR = 2  # px between tiles (and around the grid)
MIN_GRID_WIDTH = 256  # small images are upscaled (integer factor) until the grid is this wide
MIN_CAPTIONED_TILE = 96  # ... and, with captions, until each tile is this wide
CAPTION_LINES = 3  # a caption is wrapped to at most this many lines, then cut with "..."
_BACKGROUND = 128  # separator grey
_CAPTION_BG, _CAPTION_FG = (255, 255, 255), (0, 0, 0)


def as_uint8_images(images, what: str = "images") -> np.ndarray:
    """[N, H, W, 3] uint8 from uint8, or from floats in [0, 1]; ValueError otherwise."""
    a = np.asarray(images)
    if a.ndim != 4 or a.shape[-1] != 3 or a.shape[0] < 1 or a.shape[1] < 1 or a.shape[2] < 1:
        raise ValueError(
            f"{what}: expected a batch of RGB images shaped [N, H, W, 3] with N >= 1, got shape "
            f"{a.shape} (a single image needs a leading batch axis: images[None])"
        )
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(np.min(a)), float(np.max(a))
        if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{what}: float images must lie in [0, 1], got values in [{lo}, {hi}] "
                "(rescale, e.g. (x + 1) / 2 for [-1, 1], or pass uint8 in [0, 255])"
            )
        return np.round(a.astype(np.float32) * 255.0).astype(np.uint8)
    raise ValueError(
        f"{what}: expected dtype uint8 (0..255) or float in [0, 1], got {a.dtype} "
        "(convert with .astype(np.uint8) if the values are already 0..255)"
    )


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value
class Images:
    """Images an evaluation made, e.g. samples with their prompts.

    images: [N, H, W, 3] uint8, or floats in [0, 1] (converted to uint8 here).
    captions: empty, or one string per image (drawn under its tile in the grid).
    columns: tiles per grid row.
    """

    images: np.ndarray
    captions: tuple[str, ...] = ()
    columns: int = 8

    def __post_init__(self):
        images = as_uint8_images(self.images, "Images.images")
        captions = _check_captions(self.captions, len(images), "Images.captions")
        if not _positive_int(self.columns):
            raise ValueError(f"Images.columns must be a positive integer, got {self.columns!r}")
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "captions", captions)
        object.__setattr__(self, "columns", int(self.columns))

    def grid(self) -> np.ndarray:
        return grid(self.images, self.columns, self.captions)


@dataclasses.dataclass(frozen=True)
class Texts:
    """Generated texts: one JSON-able dict per example, e.g. {"prompt", "output", "truth"}.

    numpy scalars/arrays inside the rows are turned into plain Python values here.
    """

    rows: tuple[dict, ...]

    def __post_init__(self):
        rows = self.rows
        if isinstance(rows, Mapping) or isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise ValueError(
                f"Texts.rows must be a sequence of dicts (one per example), got {type(rows).__name__}"
            )
        clean = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"Texts.rows[{i}] must be a dict, got {type(row).__name__}: {row!r:.80}")
            bad = [k for k in row if not isinstance(k, str)]
            if bad:
                raise ValueError(f"Texts.rows[{i}] keys must be strings, got {bad!r}")
            try:
                clean.append(json.loads(json.dumps(dict(row), default=_json_default)))
            except (TypeError, ValueError) as e:
                raise ValueError(f"Texts.rows[{i}] is not JSON-serialisable: {e}") from None
        object.__setattr__(self, "rows", tuple(clean))

    def columns(self) -> list[str]:
        """The union of the rows' keys, in first-seen order."""
        return list(dict.fromkeys(k for r in self.rows for k in r))

    def jsonl(self) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)


ARTEFACTS = (Images, Texts)  # isinstance(v, ARTEFACTS): an evaluation result that is not a scalar


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} {v!r:.60}")


def _positive_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1


def _check_captions(captions, n: int, what: str) -> tuple[str, ...]:
    if captions is None:
        return ()
    if isinstance(captions, str):
        raise ValueError(f"{what}: expected a sequence of strings (one per image), got a single string")
    captions = tuple(captions)
    if captions and len(captions) != n:
        raise ValueError(f"{what}: expected no captions or one per image ({n}), got {len(captions)}")
    bad = [c for c in captions if not isinstance(c, str)]
    if bad:
        raise ValueError(f"{what}: captions must be strings, got {bad[0]!r}")
    return captions


# ---- the grid ----------------------------------------------------------------------------
def scale_factor(width: int, columns: int, captioned: bool) -> int:
    """The integer (nearest) upscale factor `grid` uses for tiles `width` px wide."""
    s = math.ceil(MIN_GRID_WIDTH / max(1, columns * width))
    if captioned:
        s = max(s, math.ceil(MIN_CAPTIONED_TILE / width))
    return max(1, s)


def grid(images, columns: int, captions: Sequence[str] = ()) -> np.ndarray:
    """One [H', W', 3] uint8 image: the tiles row by row, `SEPARATOR` px apart and around.

    With captions, a white strip under each tile holds its caption in PIL's default font,
    wrapped to the tile width (at most `CAPTION_LINES` lines, then cut with "...").
    Small images are upscaled by an integer factor (nearest neighbour; `scale_factor`) so
    the grid is at least `MIN_GRID_WIDTH` px wide and captioned tiles at least
    `MIN_CAPTIONED_TILE` px. Tile (r, c) starts at
    x = SEPARATOR + c * (tile_w + SEPARATOR), y = SEPARATOR + r * (tile_h + strip + SEPARATOR).
    """
    images = as_uint8_images(images)
    n, h, w, _ = images.shape
    captions = _check_captions(captions, n, "captions")
    if not _positive_int(columns):
        raise ValueError(f"columns must be a positive integer, got {columns!r}")
    cols = min(int(columns), n)
    rows = math.ceil(n / cols)
    s = scale_factor(w, cols, bool(captions))
    tw, th = w * s, h * s
    tiles = images.repeat(s, axis=1).repeat(s, axis=2) if s > 1 else images

    strip, lines = 0, []
    if captions:
        font = _font()
        line_h = _line_height(font)
        lines = [_wrap(c, font, tw - 4) for c in captions]
        strip = max(len(l) for l in lines) * line_h + 4 if any(lines) else 0
    sep = SEPARATOR
    out = np.full((sep + rows * (th + strip + sep), sep + cols * (tw + sep), 3), _BACKGROUND, np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = sep + c * (tw + sep), sep + r * (th + strip + sep)
        out[y : y + th, x : x + tw] = tiles[i]
        if strip:
            out[y + th : y + th + strip, x : x + tw] = _CAPTION_BG
    if strip and any(lines):
        from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel

        canvas = Image.fromarray(out)
        draw = ImageDraw.Draw(canvas)
        for i, text_lines in enumerate(lines):
            r, c = divmod(i, cols)
            x, y = sep + c * (tw + sep) + 2, sep + r * (th + strip + sep) + th + 2
            for j, line in enumerate(text_lines):
                draw.text((x, y + j * line_h), line, fill=_CAPTION_FG, font=font)
        out = np.asarray(canvas, dtype=np.uint8).copy()
    return out


@functools.lru_cache(maxsize=1)
def _font():
    from PIL import ImageFont  # pylint: disable=import-outside-toplevel

    try:
        return ImageFont.load_default(size=12)  # FreeType build of Pillow >= 10.1
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_width(font, text: str) -> float:
    if hasattr(font, "getlength"):
        return font.getlength(text)
    left, _, right, _ = font.getbbox(text)
    return right - left


def _line_height(font) -> int:
    _, top, _, bottom = font.getbbox("Ag|y")
    return int(bottom - min(top, 0)) + 2


def _wrap(text: str, font, width: float) -> list[str]:
    """Greedy word wrap to `width` px; long words are broken; at most CAPTION_LINES lines."""
    lines: list[str] = []
    cur = ""
    for word in " ".join(text.split()).split(" "):
        if not word:
            continue
        cand = f"{cur} {word}" if cur else word
        if _text_width(font, cand) <= width:
            cur = cand
            continue
        if cur:
            lines.append(cur)
        cur = ""
        while _text_width(font, word) > width and len(word) > 1:  # break a word wider than a tile
            k = len(word) - 1
            while k > 1 and _text_width(font, word[:k]) > width:
                k -= 1
            lines.append(word[:k])
            word = word[k:]
        cur = word
    if cur:
        lines.append(cur)
    if len(lines) > CAPTION_LINES:
        last = lines[CAPTION_LINES - 1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines = lines[: CAPTION_LINES - 1] + [last.rstrip() + "..."]
    return lines
