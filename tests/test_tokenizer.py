"""The stored shapes tokenizer: loading, exact round trips, whole-word tokens, fixed special ids,
reproducible training, and the batch / image-code helpers."""

import re

import numpy as np
import pytest
from transformers import AutoTokenizer

from mmjax.data import shapes
from mmjax.data import tokenizer as T

WORDS = (
    shapes.COLORS + shapes.SHAPES + shapes.SIZES + shapes.NUMBER_WORDS + ('left', 'right', 'above', 'below')
)


@pytest.fixture(scope='module')
def tok():
    return AutoTokenizer.from_pretrained(str(T.default_path()), local_files_only=True)


@pytest.fixture(scope='module')
def val_texts():
    return list(T.shapes_texts('val', 200))


def test_loads_with_auto_tokenizer(tok):
    assert len(tok) == len(T.load()) <= T.VOCAB_SIZE
    assert tok('a red circle').input_ids == T.load()('a red circle').input_ids


def test_round_trips_every_val_text_exactly(tok, val_texts):
    assert len(val_texts) == 200 * 6  # caption, question, answer, region, edit, paragraph
    for text in val_texts:
        ids = tok(text).input_ids
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_vocabulary_words_are_single_tokens(tok, val_texts):
    for word in WORDS + tuple(s + 's' for s in shapes.SHAPES):
        for text in (word, f'{word} or', f'is there a {word}?', f'a {word}, two'):
            assert f'▁{word}' in tok.tokenize(text), (text, tok.tokenize(text))
    split = {w for t in val_texts for w in re.findall(r'\w+', t) if len(tok.tokenize(' ' + w)) != 1}
    assert not split, f'words split into several tokens: {sorted(split)}'


def test_special_tokens_have_fixed_ids_and_never_split(tok):
    assert tok.convert_tokens_to_ids(list(T.SPECIAL_TOKENS)) == list(range(len(T.SPECIAL_TOKENS)))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    emb, cap, image = tok.convert_tokens_to_ids([T.EMB, T.CAP, T.IMAGE])
    ids = tok(f'{T.IMAGE}{T.IMAGE} a red circle{T.EMB}').input_ids
    assert ids[:3] == [tok.bos_token_id, image, image] and ids[-1] == emb
    ids = tok(f'x{T.CAP}[CAP ]{T.CAP}<reserved_15>').input_ids
    assert ids.count(cap) == 2 and ids[-1] == T.SPECIAL_TOKENS.index('<reserved_15>')
    assert tok.decode(tok(f'{T.IMAGE} two squares{T.EMB}').input_ids) == f'<s>{T.IMAGE} two squares{T.EMB}'


def test_adds_bos_not_eos_and_unknown_characters_map_to_unk(tok):
    ids = tok('a square').input_ids
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert tok('a ∆ square').input_ids.count(tok.unk_token_id) == 1


def test_retraining_reproduces_the_stored_files(tmp_path):
    T.main(['train', '--out', str(tmp_path)])
    for name in ('tokenizer.json', 'tokenizer_config.json'):
        assert (tmp_path / name).read_bytes() == (T.default_path() / name).read_bytes(), name


def test_captions_take_few_tokens_per_word(tok):
    texts = [r['text'] for r in shapes.ShapesSource('val', 'caption', num_records=200)]
    tokens = sum(len(tok(t, add_special_tokens=False).input_ids) for t in texts)
    words = sum(len(t.split()) for t in texts)
    print(f'captions: {tokens / len(texts):.2f} tokens per caption, {tokens / words:.3f} per word')
    assert tokens / words < 1.1


def test_encode_batch_pads_and_truncates(tok):
    texts = ['a red circle', 'there are two small cyan squares, a red circle and three triangles']
    ids, mask = T.encode_batch(tok, texts, 8)
    assert ids.dtype == np.int32 and ids.shape == mask.shape == (2, 8) and mask.dtype == bool
    full = tok(texts[0]).input_ids
    np.testing.assert_array_equal(ids[0], full + [tok.pad_token_id] * (8 - len(full)))
    np.testing.assert_array_equal(mask[0], np.arange(8) < len(full))
    np.testing.assert_array_equal(ids[1], tok(texts[1]).input_ids[:8])
    assert mask[1].all()


def test_with_image_codes_adds_consecutive_ids():
    tok = T.load()
    size = len(tok)
    ids = T.with_image_codes(tok, 7)
    assert ids.dtype == np.int32 and ids.tolist() == list(range(size, size + 7)) and len(tok) == size + 7
    np.testing.assert_array_equal(T.with_image_codes(tok, 7), ids)  # idempotent
    enc = tok('<img_6><img_0> a<img_3>').input_ids
    assert enc == [tok.bos_token_id, ids[6], ids[0], *tok('a', add_special_tokens=False).input_ids, ids[3]]
    assert tok.decode(enc, skip_special_tokens=True) == 'a'
    assert len(T.load()) == size  # the stored tokenizer is unchanged
