"""prunekit.train.distill on a tiny random-init Hugging Face BertModel pruned by surgery (heads + FFN neurons)."""
import copy
import importlib.util

import pytest
import torch

import prunekit
from prunekit import surgery
from prunekit.train.distill import agreement, distill

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                 reason="transformers not installed")]


def _bert_forward(model, x):
    return model(input_ids=x[0], attention_mask=x[1])


def _setup():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    # larger weights than BERT's default init: heads and neurons must matter for pruning to hurt;
    # no dropout, so that the student is trained on what it is measured on
    cfg = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=16, initializer_range=0.2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    teacher = BertModel(cfg).eval()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 50, (8, 10), generator=g), torch.ones(8, 10, dtype=torch.long))
               for _ in range(6)]
    plan = surgery.plan_groups(teacher, batches[0], 0.5, criterion="l1")
    return teacher, batches, plan


KW = dict(output="last_hidden_state", forward_fn=_bert_forward, pairs=False, loss="mse",
          hidden=["encoder.layer.0"], epochs=8, lr=1e-3)


@pytest.mark.slow
def test_compacted_and_masked_students_recover_and_stay_equivalent():
    teacher, batches, plan = _setup()
    slim = surgery.compact(teacher, plan, batches[0])
    masked = prunekit.apply_plan(copy.deepcopy(teacher), plan)
    ev = dict(output="last_hidden_state", forward_fn=_bert_forward, pairs=False)
    before = agreement(slim, teacher, batches, **ev)
    teacher_state = {k: v.clone() for k, v in teacher.state_dict().items()}
    distill(slim, teacher, batches, **KW)
    distill(masked, teacher, batches, **KW)
    after = agreement(slim, teacher, batches, **ev)
    assert after["mse"] < 0.5 * before["mse"] and after["cosine"] > before["cosine"] + 0.1
    assert all(torch.equal(v, teacher_state[k]) for k, v in teacher.state_dict().items())
    # the masks held: the distilled masked model still compacts to an equivalent slim model
    again = surgery.compact(masked, plan, batches[0])
    with torch.no_grad():
        x = batches[1]
        torch.testing.assert_close(_bert_forward(again, x).last_hidden_state,
                                   _bert_forward(masked.eval(), x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in again.parameters()) == sum(p.numel() for p in slim.parameters())
