"""The README's "start from a Hugging Face checkpoint" path, as written, on a tiny random HF Llama
saved with save_pretrained (with its own tokenizer, which lacks MM1's <image> token):
hf-import -> MM1 training with a scanned LLM and the HF tokenizer (the recipe adds <image>, the
embedding table grows on load) -> export of the LLM subtree -> hf-export -> transformers loads it,
tokenizer included, and computes the same logits as the trained mmjax LLM."""

import os

import jax
import numpy as np
import torch
import transformers as tr
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from conftest import ROOT, run_mmjax
from mmjax import cli, config as config_lib, tree, weights
from mmjax.data import tokenizer as tok_lib
from mmjax.interop import hf
from mmjax.models.llm import LLM
from mmjax.train import trainer as trainer_lib

MM1 = os.path.join(ROOT, "configs", "mm1.py:tiny")


def _hf_llama(path):
    """A random Llama shaped like configs/mm1.py:tiny's LLM, with a word-level tokenizer of its own."""
    texts = list(tok_lib.shapes_texts("train", 200))
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.train_from_iterator(
        texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    )
    fast = tr.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    config = tr.LlamaConfig(
        vocab_size=len(fast),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    tr.LlamaForCausalLM(config).save_pretrained(str(path))
    fast.save_pretrained(str(path))
    return len(fast)


def test_readme_hugging_face_path(tmp_path):
    hf_dir, ckpt, run = tmp_path / "TinyLlama", tmp_path / "ckpt_llm", str(tmp_path / "run")
    vocab = _hf_llama(hf_dir)
    hf.hf_import(str(hf_dir), str(ckpt))  # = mmjax convert hf-import (tests/test_hf_llm.py runs that CLI)
    data = [f"--config.data.components.{n}.num_records=64" for n in ("caption", "interleaved", "text")]
    args = ["--config", MM1, "--config.model.scan=True", f"--config.model.tokenizer={hf_dir}", *data]
    run_mmjax(
        "train",
        *args,
        "--workdir",
        run,
        f"--config.init.llm.path={ckpt}",
        "--config.train.steps=4",
        "--config.evals={}",
    )
    # export and convert in this process (the CLI's own code path, without two more interpreter starts)
    assert cli.main(["export", *args, "--workdir", run, "--part", "llm"]) == 0
    out = tmp_path / "my-llm"
    assert cli.main(["convert", "hf-export", os.path.join(run, "export_llm"), str(out)]) == 0

    model = tr.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = tr.AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == vocab + 1 == model.config.vocab_size  # <image> was added, the table grew
    assert tokenizer.convert_tokens_to_ids("<image>") == vocab
    ids = tokenizer("a red circle to the left of a blue square")["input_ids"]
    assert tokenizer.unk_token_id not in ids

    cfg = config_lib.load(MM1, [a.removeprefix("--config.") for a in args[2:]] + [f"init.llm.path={ckpt}"])
    state, _, _, step = trainer_lib.Trainer(cfg, run).latest()
    assert step == 4
    trained = jax.device_get(state.params["llm"])
    assert "blocks" in trained["decoder"]  # the scanned layout, from a per-layer import
    imported, _ = weights.load(ckpt)
    moved = np.abs(trained["embedder"]["embedding"][:vocab] - imported["embedder"]["embedding"])
    assert 0 < moved.max() < 0.01  # started from the imported rows (4 warm-up steps move them little)
    llm = LLM(**weights.read_meta(os.path.join(run, "export_llm"))["model"], scan=True)
    tokens = np.array([ids + [vocab]])  # ... and the added <image> token
    mine, _ = llm.apply({"params": trained}, tokens)
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(mine), theirs, atol=1e-4, rtol=1e-4)
    flat = tree.flat(trained)
    assert flat["embedder/embedding"].shape == (vocab + 1, 128)
