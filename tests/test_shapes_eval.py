"""shapes-eval: the analytic detector, GenEval-style scoring, caption / VQA tools and the CLI."""

import collections
import json

import numpy as np
import pytest
from PIL import Image

from mmjax.data import shapes
from mmjax.data.shapes import BACKGROUND, COLORS, Object, Scene, ShapesSource
from mmjax.eval import shapes_eval as se

N_PER_TASK = 200
PROMPTS = se.geneval_prompts(N_PER_TASK, seed=0)


def _blur(x):
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode='edge')
    return sum(p[i : i + x.shape[0], j : j + x.shape[1]] for i in range(3) for j in range(3)) / 9


@pytest.mark.parametrize('size', [32, 64])
def test_scorer_on_ground_truth_renders(size):
    rng = np.random.default_rng(size)
    images = [shapes.render(se.scene_for_prompt(p, rng), size) for p in PROMPTS]
    result = se.evaluate(images, PROMPTS)
    print(f'\n{size}px ground truth\n' + se.format_table(result))
    assert result['num_images'] == 6 * N_PER_TASK
    assert all(result[t] >= 0.99 for t in se.TASKS), result
    # Each prompt against the next prompt's image of its task: mostly wrong.
    shifted = [images[i - i % N_PER_TASK + (i + 1) % N_PER_TASK] for i in range(len(images))]
    wrong = se.evaluate(shifted, PROMPTS)
    print(f'{size}px mismatched\n' + se.format_table(wrong))
    assert all(wrong[t] <= 0.5 for t in se.TASKS) and wrong['overall'] <= 0.3, wrong
    blank = np.broadcast_to(BACKGROUND, images[0].shape)
    assert not any(se.score(blank, p) for p in PROMPTS[::10])


def test_scorer_tolerates_noise_and_blur():
    prompts = se.geneval_prompts(50, seed=1)
    rng = np.random.default_rng(0)
    for size, distort, floor in (
        (32, lambda x: x + rng.normal(0, 15, x.shape) + rng.uniform(-20, 20, 3), 0.99),
        (64, lambda x: _blur(x) + rng.normal(0, 10, x.shape), 0.97),
    ):
        images = [
            np.clip(distort(shapes.render(se.scene_for_prompt(p, rng), size).astype(float)), 0, 255).astype(
                np.uint8
            )
            for p in prompts
        ]
        assert se.evaluate(images, prompts)['overall'] >= floor


@pytest.mark.parametrize('size', [32, 64])
def test_detect_recovers_scenes(size):
    hits = []
    for split in ('train', 'test'):
        for i in range(400):
            sc = shapes.scene(split, i)
            image = shapes.render(sc, size)
            got = collections.Counter((d.shape, d.color, d.size, d.box) for d in se.detect(image))
            hits.append(got == collections.Counter((o.shape, o.color, o.size, o.box) for o in sc.objects))
            assert se.matches_scene(image, sc) >= hits[-1]
    assert np.mean(hits) >= 0.99


def test_detect_ignores_specks_and_background():
    image = np.broadcast_to(BACKGROUND, (32, 32, 3)).copy()
    assert se.detect(image) == []
    rng = np.random.default_rng(0)
    for y, x in rng.integers(0, 32, (12, 2)):
        image[y, x] = shapes.PALETTE[rng.integers(len(COLORS))]
    assert se.detect(image) == []
    with pytest.raises(ValueError, match='H, W, 3'):
        se.detect(image[..., 0])


def test_captions_parse_back():
    assert se.parse_caption('there are two green triangles and a circle') == collections.Counter(
        {('green', 'triangle'): 2, (None, 'circle'): 1}
    )
    left = Scene(
        (
            Object('circle', 'red', 'small', (0.1, 0.4, 0.32, 0.62)),
            Object('square', 'blue', 'large', (0.6, 0.3, 0.975, 0.675)),
        )
    )
    assert se.caption_correct('a red circle to the left of a blue square', left, complete=True)
    assert se.caption_correct('a circle to the left of a large square', left)
    assert not se.caption_correct('a red circle to the right of a blue square', left)
    assert not se.caption_correct('a small square', left)
    assert not se.caption_correct('two red circles', left)
    assert not se.caption_correct('a red circle', left, complete=True)
    assert not se.caption_correct('nothing to see', left)

    rng = np.random.default_rng(0)
    correct, rejected = [], []
    for split in ('train', 'test'):
        src = ShapesSource(split, 'caption')
        for i in range(500):
            text, sc = src[i]['text'], shapes.scene(split, i)
            correct.append(se.caption_correct(text, sc))
            # Corrupt one colour word into a colour the scene lacks.
            words = text.split()
            spots = [j for j, w in enumerate(words) if w in COLORS]
            if spots:
                j = spots[rng.integers(len(spots))]
                words[j] = next(c for c in rng.permutation(COLORS) if not shapes.select(sc, color=c))
                rejected.append(not se.caption_correct(' '.join(words), sc))
    assert all(correct)
    assert len(rejected) > 300 and all(rejected)
    # GenEval prompt texts are true captions of their ground-truth scenes.
    assert all(se.caption_correct(p.text, se.scene_for_prompt(p, rng), complete=True) for p in PROMPTS[::5])


def test_answer_agrees_with_qa_view():
    for split in ('train', 'test'):
        src = ShapesSource(split, 'qa')
        for i in range(1000):
            rec = src[i]
            sc = shapes.scene_from_arrays(
                rec['num_objects'], rec['obj_shape'], rec['obj_color'], rec['obj_size'], rec['obj_box']
            )
            assert se.answer(sc, rec['question']) == rec['answer'], rec['question']
            assert se.normalize_answer(f' The {rec["answer"].upper()}.') == rec['answer']
    assert se.normalize_answer('2') == 'two'
    two = Scene(
        (
            Object('circle', 'red', 'small', (0.1, 0.1, 0.32, 0.32)),
            Object('circle', 'blue', 'small', (0.5, 0.5, 0.72, 0.72)),
        )
    )
    assert se.answer(two, 'How many circles are there?') == 'two'
    assert se.answer(two, 'is the red circle above or below the blue circle?') == 'above'
    with pytest.raises(ValueError, match='matches 2 objects'):
        se.answer(two, 'what colour is the circle?')
    with pytest.raises(ValueError, match='not a shapes-world question'):
        se.answer(two, 'why?')


def test_region_boxes_hold_the_region():
    src = ShapesSource('val', 'region', image_size=64)
    for i in range(100):
        rec = src[i]
        assert any(np.allclose(rec['box'], b) for b in se.region_boxes(rec['image']))


def test_cli_round_trip(tmp_path, capsys):
    prompts, images, out = tmp_path / 'prompts.jsonl', tmp_path / 'images', tmp_path / 'r.json'
    assert se.main(['--write-prompts', '5', str(prompts), '--render', str(images)]) == 0
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    assert len(lines) == 30 and set(lines[0]) == {'file', 'task', 'text', 'spec'}
    assert se.main(['--images', str(images), '--prompts', str(prompts), '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['overall'] == 1.0 and len(result['per_image']) == 30
    assert '| Overall |' in capsys.readouterr().out

    # A wrong image for the first prompt is scored wrong.
    Image.fromarray(np.broadcast_to(BACKGROUND, (32, 32, 3)).copy()).save(images / '00000.png')
    se.main(['--images', str(images), '--prompts', str(prompts), '--out', str(out)])
    assert json.loads(out.read_text())['per_image'][0]['correct'] is False

    for argv, message in (
        (['--images', str(tmp_path / 'nope'), '--prompts', str(prompts)], 'images folder not found'),
        (['--images', str(images), '--prompts', str(tmp_path / 'x.jsonl')], 'prompts file not found'),
        (['--images', str(images)], 'give --images DIR and --prompts FILE'),
    ):
        with pytest.raises(SystemExit) as e:
            se.main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err
    (images / '00003.png').unlink()
    with pytest.raises(SystemExit):
        se.main(['--images', str(images), '--prompts', str(prompts)])
    assert '1 image(s) missing' in capsys.readouterr().err


def test_geneval_finalizer_scores_oracle_and_blank_images():
    import ml_collections

    from mmjax.eval import artefacts

    spec = ml_collections.ConfigDict(dict(prompts_per_task=2, samples_per_prompt=2))
    fin, src = se.GenEval(spec), se.PromptSource(2, 2)
    rng = np.random.default_rng(0)
    index = np.arange(len(src))
    oracle = [
        shapes.render(se.scene_for_prompt(se.Prompt(r["task"], r["text"], json.loads(r["spec"])), rng), 64)
        for r in (src[i] for i in index)
    ]
    good = fin({"image": np.stack(oracle), "index": index})
    blank = fin({"image": np.full_like(np.stack(oracle), 255), "index": index})
    assert good["overall"] == 1.0 and blank["overall"] == 0.0
    assert set(se.TASKS) <= set(good) and isinstance(good["samples"], artefacts.Images)
