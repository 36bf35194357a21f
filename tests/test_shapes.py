"""The shapes world: determinism, disjoint splits, held-out pairs, record layout."""

import re

import grain
import numpy as np
import pytest

from mmjax.data import shapes
from mmjax.data.shapes import HELD_OUT, SPLITS, VIEWS, ShapesSource
from mmjax.eval import shapes_eval

GT = {'num_objects', 'obj_shape', 'obj_color', 'obj_size', 'obj_box'}
FIELDS = {
    'image': {'image'} | GT,
    'caption': {'image', 'text'} | GT,
    'qa': {'image', 'question', 'answer'} | GT,
    'region': {'image', 'box', 'text'} | GT,
    'edit': {'image', 'instruction', 'target_image'} | GT | {'target_' + k for k in GT},
    'interleaved': {'images', 'texts'},
    'text': {'text'},
}


def assert_records_equal(a, b):
    assert a.keys() == b.keys()
    for k, v in a.items():
        if isinstance(v, (str, tuple)):
            assert v == b[k], k
        else:
            assert np.asarray(v).dtype == np.asarray(b[k]).dtype, k
            np.testing.assert_array_equal(v, b[k], err_msg=k)


def gt_scene(rec, prefix=''):
    return shapes.scene_from_arrays(
        *(rec[prefix + k] for k in ('num_objects', 'obj_shape', 'obj_color', 'obj_size', 'obj_box'))
    )


@pytest.mark.parametrize('view', VIEWS)
def test_records_deterministic_by_index(view):
    a, b = ShapesSource('train', view), ShapesSource('train', view)
    for i in (0, 7, 123_456, 999_999):
        rec = a[i]
        assert_records_equal(rec, a[i])
        assert_records_equal(rec, b[i])  # a fresh instance
        assert rec['index'] == i and rec['index'].dtype == np.int64 and rec['split'] == 'train'
    assert shapes.scene('train', 3) == shapes.scene('train', 3)
    assert len({shapes.scene('train', i) for i in range(200)}) >= 195  # the world is finite
    assert shapes.scene('train', 3, seed=1) != shapes.scene('train', 3)


def test_grain_workers_match_in_process_reads():
    src = ShapesSource('train', 'caption')
    ds = grain.MapDataset.source(src)[:64]
    got = list(ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=2)))
    assert len(got) == 64
    for i, rec in enumerate(got):
        assert_records_equal(rec, src[i])


def test_splits_disjoint():
    images = {s: {shapes.render(shapes.scene(s, i)).tobytes() for i in range(1000)} for s in SPLITS}
    # 1/4 of scenes hold one object, from ~17k such images: unpartitioned splits would collide.
    assert not images['train'] & images['val']
    assert not images['train'] & images['test']
    assert not images['val'] & images['test']


def _pairs(rec):
    """(colour, shape) pairs of every scene in a record (ground truth, else detected)."""
    pairs = set()
    for prefix in ('', 'target_'):
        if prefix + 'num_objects' in rec:
            pairs |= {(o.color, o.shape) for o in gt_scene(rec, prefix).objects}
    for image in rec.get('images', ()):
        pairs |= {(d.color, d.shape) for d in shapes_eval.detect(image)}
    return pairs


def _texts(rec):
    return [v for k, v in rec.items() if k in ('text', 'question', 'instruction')] + list(
        rec.get('texts', ())
    )


def _names_held_out(text):
    return any(re.search(rf'\b{c} {s}', text) for c, s in HELD_OUT)


def test_held_out_pairs_only_in_test():
    for i in range(2000):
        assert not shapes.has_held_out(shapes.scene('train', i))
    for i in range(500):
        assert not shapes.has_held_out(shapes.scene('val', i))
    test = [shapes.scene('test', i) for i in range(400)]
    assert all(shapes.has_held_out(sc) for sc in test[::4])
    assert np.mean([shapes.has_held_out(sc) for sc in test]) >= 0.25


@pytest.mark.parametrize('view', ['caption', 'qa', 'region', 'edit', 'interleaved', 'text'])
def test_held_out_pairs_never_in_train_paired_views(view):
    src = ShapesSource('train', view)
    for i in range(500 if view in ('interleaved', 'text') else 2000):
        rec = src[i]
        assert not _pairs(rec) & set(HELD_OUT), (i, rec)
        assert not any(_names_held_out(t) for t in _texts(rec)), (i, _texts(rec))
    if view == 'caption':  # while the test split's paired data names them
        test = ShapesSource('test', view)
        assert sum(_names_held_out(test[i]['text']) for i in range(200)) >= 10


@pytest.mark.parametrize('size', [32, 64])
@pytest.mark.parametrize('view', VIEWS)
def test_record_layout(view, size):
    src = ShapesSource('val', view, image_size=size, images_per_doc=2)
    recs = [src[i] for i in range(20)]
    for rec in recs:
        assert set(rec) == FIELDS[view] | {'index', 'split'}
        for k, v in rec.items():  # fixed shapes, so records batch
            if not isinstance(v, (str, tuple)):
                assert np.shape(v) == np.shape(recs[0][k]), k
        for name in ('image', 'target_image'):
            if name in rec:
                assert rec[name].shape == (size, size, 3) and rec[name].dtype == np.uint8
        for prefix in ('', 'target_'):
            if prefix + 'num_objects' in rec:
                n = rec[prefix + 'num_objects']
                assert n.dtype == np.int32 and 1 <= n <= shapes.MAX_OBJECTS
                for k in ('obj_shape', 'obj_color', 'obj_size'):
                    v = rec[prefix + k]
                    assert v.dtype == np.int32 and v.shape == (shapes.MAX_OBJECTS,)
                    assert (v[:n] >= 0).all() and (v[n:] == -1).all()
                box = rec[prefix + 'obj_box']
                assert box.dtype == np.float32 and box.shape == (shapes.MAX_OBJECTS, 4)
                assert (box[:n] > 0).all() and (box[:n] < 1).all() and (box[n:] == 0).all()
        if view == 'interleaved':
            assert rec['images'].shape == (2, size, size, 3) and rec['images'].dtype == np.uint8
            assert len(rec['texts']) == 2 and all(isinstance(t, str) and t for t in rec['texts'])
        for k in ('text', 'question', 'answer', 'instruction'):
            if k in rec:
                assert isinstance(rec[k], str) and rec[k]
        if view == 'region':
            assert rec['box'].dtype == np.float32 and rec['box'].shape == (4,)
            assert any(np.array_equal(rec['box'], b) for b in rec['obj_box'])
            o = [o for o in gt_scene(rec).objects if np.allclose(o.box, rec['box'])][0]
            assert rec['text'] == f'a {o.size} {o.color} {o.shape}'
        if view == 'edit':
            assert gt_scene(rec, 'target_') != gt_scene(rec)
        if view in ('caption', 'qa', 'region', 'edit'):
            assert gt_scene(rec) == shapes.scene('val', int(rec['index']))


def test_layout_and_render():
    for i in range(300):
        sc = shapes.scene('train', i)
        boxes = [tuple(round(v * shapes.GRID) for v in o.box) for o in sc.objects]
        for j, a in enumerate(boxes):
            assert min(a) >= 1 and max(a) <= shapes.GRID - 1
            assert a[2] - a[0] == a[3] - a[1] == shapes.SIDE[sc.objects[j].size]
            for b in boxes[j + 1 :]:  # separated by >= GAP cells along some axis
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= shapes.GAP
    assert shapes.render(shapes.scene('train', 0), 48).shape == (48, 48, 3)
    # Small and large are clearly apart in area, for every shape and resolution.
    for size in (32, 64):
        for shape in shapes.SHAPES:
            area = {
                z: (
                    shapes.render(
                        shapes.Scene(
                            (
                                shapes.Object(
                                    shape,
                                    'red',
                                    z,
                                    (0.25, 0.25, 0.25 + shapes.SIDE[z] / 32, 0.25 + shapes.SIDE[z] / 32),
                                ),
                            )
                        ),
                        size,
                    )
                    != shapes.BACKGROUND
                )
                .any(-1)
                .sum()
                for z in shapes.SIZES
            }
            assert area['large'] > 2.5 * area['small']
    # Palette colours are far apart and far from the background.
    ref = np.concatenate([shapes.PALETTE, shapes.BACKGROUND[None]]).astype(float)
    dist = np.linalg.norm(ref[:, None] - ref[None], axis=-1)
    assert dist[~np.eye(len(ref), dtype=bool)].min() >= 120


def test_errors_and_repr():
    with pytest.raises(ValueError, match='train, val, test'):
        ShapesSource('dev')
    with pytest.raises(ValueError, match='image, caption, qa'):
        ShapesSource('train', 'video')
    with pytest.raises(ValueError, match='train, val, test'):
        shapes.scene('dev', 0)
    with pytest.raises(ValueError, match='image_size'):
        shapes.render(shapes.scene('train', 0), 16)
    src = ShapesSource('test', 'qa', num_records=10)
    with pytest.raises(IndexError):
        src[10]
    assert len(src) == 10 and 'view=\'qa\'' in repr(src)
    assert [len(ShapesSource(s)) for s in SPLITS] == [1_000_000, 2_000, 2_000]
