"""The vit_shapes recipe learns: loss falls and the evaluator's F1 beats the untrained model."""

import pytest

from mmjax.train import trainer as trainer_lib


@pytest.mark.long
def test_tiny_training_improves_the_evaluator(tmp_path, tiny_config):
    cfg = tiny_config("train.steps=200", "train.log_every=10", "evals.val.num_examples=256")
    trainer = trainer_lib.Trainer(cfg, str(tmp_path))
    before = trainer.evaluate(trainer.init_state(), {})
    final = trainer.fit()
    rows = [r for r in open(tmp_path / "metrics.jsonl").read().splitlines()]
    assert len(rows) >= 20
    assert final["loss"] < 0.4 * 0.693, final  # from ln 2 at a zero-initialised head
    assert final["val/f1"] > before["val/f1"] + 0.1, (before, final)
    assert set(before) == {"val/precision", "val/recall", "val/f1", "val/scene_accuracy"}
