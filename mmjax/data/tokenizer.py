"""The shapes world's tokenizer: a small BPE stored in Hugging Face format, and text helpers.

The stored tokenizer (mmjax/assets/tokenizers/shapes) is a BPE trained with the `tokenizers`
library on the text views of the first TRAIN_RECORDS train records of each view (deterministic).
Training stops once every word is whole, at 352 tokens (VOCAB_SIZE is the cap). It is regenerated,
byte for byte, by

    python -m mmjax.data.tokenizer train --out mmjax/assets/tokenizers/shapes

Pre-tokenization (SentencePiece style): a space becomes '▁' and starts a new piece, '▁' is prepended
to the text, punctuation is split off. So every word of the shapes world is one token ('▁red',
'▁circle', '▁left'; '▁Two' at a sentence start) and decoding restores the text exactly, no
normalisation. The alphabet is printable ASCII plus tab and newline; other characters map to <unk>.

Special tokens, fixed ids: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4, [EMB]=5, [CAP]=6 and
<reserved_0>..<reserved_15> = 7..22, for recipes that need more without growing the embedding
table. Special tokens are never split; a space before one stays a '▁' token, so append them
without a space or by id. `tokenizer(text)` adds BOS (<s>) and no EOS (recipes append
`eos_token_id` where a target needs it); padding and truncation are on the right.
"""

from __future__ import annotations

import argparse
import importlib.resources
import string
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mmjax.data.shapes import ShapesSource

PAD, BOS, EOS, UNK = '<pad>', '<s>', '</s>', '<unk>'
IMAGE, EMB, CAP = '<image>', '[EMB]', '[CAP]'
NUM_RESERVED = 16
RESERVED = tuple(f'<reserved_{i}>' for i in range(NUM_RESERVED))
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, IMAGE, EMB, CAP) + RESERVED
VOCAB_SIZE = 512
ALPHABET = sorted(set(string.printable) - set(' \r\x0b\x0c'))  # ' ' becomes '▁'
TEXT_VIEWS = {
    'caption': ('text',),
    'qa': ('question', 'answer'),
    'region': ('text',),
    'edit': ('instruction',),
    'text': ('text',),
}
TRAIN_RECORDS = 2000  # per view


def default_path():
    """The stored shapes tokenizer folder (inside the installed package)."""
    return importlib.resources.files('mmjax.assets') / 'tokenizers' / 'shapes'


def load(path=None) -> PreTrainedTokenizerFast:
    """A local Hugging Face tokenizer folder (default: the stored shapes tokenizer); never downloads."""
    return AutoTokenizer.from_pretrained(str(path or default_path()), local_files_only=True)


def shapes_texts(split: str = 'train', num_records: int = TRAIN_RECORDS, seed: int = 0) -> Iterator[str]:
    """Every text of the first `num_records` records of each text view of the shapes world."""
    for view, keys in TEXT_VIEWS.items():
        source = ShapesSource(split, view, num_records=num_records, seed=seed)
        for i in range(num_records):
            record = source[i]
            yield from (record[k] for k in keys)


def train(texts, vocab_size: int = VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on `texts` (deterministic: same texts, same tokenizer)."""
    tok = Tokenizer(models.BPE(unk_token=UNK, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme='first'), pre_tokenizers.Punctuation('isolated')]
    )
    tok.decoder = decoders.Metaspace(prepend_scheme='first')
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=ALPHABET + ['▁'],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens=[IMAGE, EMB, CAP, *RESERVED],
        add_bos_token=True,
        add_eos_token=False,
        padding_side='right',
        truncation_side='right',
        clean_up_tokenization_spaces=False,
    )


def with_image_codes(tokenizer: PreTrainedTokenizerFast, n: int) -> np.ndarray:
    """Adds the n image-code tokens <img_0>..<img_{n-1}> (UniCode) as special tokens; returns their
    consecutive ids, int32 [n]. Calling it again with the same n adds nothing."""
    codes = [f'<img_{i}>' for i in range(n)]
    tokenizer.add_tokens(codes, special_tokens=True)
    ids = np.array(tokenizer.convert_tokens_to_ids(codes), np.int32)
    if n and not np.array_equal(ids, ids[0] + np.arange(n)):
        raise ValueError(f'image-code ids are not consecutive ({ids[0]}..{ids[-1]}): some already existed')
    return ids


def add_special_tokens(tokenizer: PreTrainedTokenizerFast, tokens: Sequence[str]) -> list[int]:
    """Adds the special `tokens` a recipe needs (e.g. <image> to an HF LLM's tokenizer) where they
    are missing; returns their ids. The model's vocabulary must then be len(tokenizer): weights
    folders with a shorter table grow on load (mmjax/weights.py)."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    return tokenizer.convert_tokens_to_ids(list(tokens))


def encode_batch(tokenizer, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [B, max_len], mask bool [B, max_len]): BOS + text, truncated and right-padded."""
    enc = tokenizer(
        list(texts), max_length=max_len, padding='max_length', truncation=True, return_tensors='np'
    )
    return enc['input_ids'].astype(np.int32), enc['attention_mask'].astype(bool)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog='python -m mmjax.data.tokenizer', description=__doc__.split('\n')[0]
    )
    sub = parser.add_subparsers(dest='command', required=True)
    cmd = sub.add_parser('train', help='train the shapes tokenizer and save it in Hugging Face format')
    cmd.add_argument('--out', required=True, type=Path, help='output folder')
    cmd.add_argument('--records', type=int, default=TRAIN_RECORDS, help='train records per text view')
    cmd.add_argument('--vocab-size', type=int, default=VOCAB_SIZE)
    args = parser.parse_args(argv)
    tokenizer = train(shapes_texts('train', args.records), args.vocab_size)
    tokenizer.save_pretrained(args.out)
    print(f'{len(tokenizer)} tokens -> {args.out}')


if __name__ == '__main__':
    main()
