"""Recovery training of a pruned decoder LLM (prunekit.train.causal_lm): masks fixed, teacher untouched."""
from __future__ import annotations

import copy

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.train.causal_lm import RecoveryOptions, next_token_loss, recover
from prunekit.zoo.llm import tiny_decoder


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 256, (8, 24), generator=torch.Generator().manual_seed(0))


def _pruned(ids):
    dense = tiny_decoder("llama", seed=0)
    student = copy.deepcopy(dense)
    prunekit.prune(student, 0.6, criterion="sequential", method="magnitude", data=ids, progress=False)
    return dense, student


def _kl_to(student, teacher, ids):
    with torch.no_grad():
        s = torch.log_softmax(student(input_ids=ids).logits, -1)
        t = torch.log_softmax(teacher(input_ids=ids).logits, -1)
    return torch.nn.functional.kl_div(s, t, log_target=True, reduction="batchmean").item()


def test_distillation_moves_the_student_towards_the_teacher_with_masks_fixed(ids):
    dense, student = _pruned(ids)
    teacher_state = {k: v.clone() for k, v in dense.state_dict().items()}
    emb = student.get_input_embeddings().weight.detach().clone()
    before = _kl_to(student, dense, ids)
    state = recover(student, ids, teacher=dense, max_steps=12, epochs=6, lr=3e-3, progress=False, log_every=1)
    assert state.step == 12 and len(state.history) == 12
    assert _kl_to(student, dense, ids) < 0.7 * before
    for name, mask in masking.masks(student).items():
        assert bool((student.get_parameter(name)[~mask.bool()] == 0).all()), name
    assert all(torch.equal(dense.state_dict()[k], v) for k, v in teacher_state.items())   # the teacher never moves
    assert torch.equal(student.get_input_embeddings().weight, emb)   # frozen by default...
    assert student.get_input_embeddings().weight.requires_grad       # ...and its flag restored


def test_fine_tuning_lowers_the_next_token_loss_and_can_train_embeddings(ids):
    _, student = _pruned(ids)
    emb = student.get_input_embeddings().weight.detach().clone()
    with torch.no_grad():
        before = next_token_loss(student(input_ids=ids).logits, ids).item()
    recover(student, ids, options=RecoveryOptions(loss="ce", batch_size=4, train_embeddings=True), max_steps=10,
            epochs=5, lr=3e-3, progress=False)
    with torch.no_grad():
        assert next_token_loss(student(input_ids=ids).logits, ids).item() < before - 0.1
    assert not torch.equal(student.get_input_embeddings().weight, emb)
    assert masking.global_sparsity(student, [n for n in masking.masks(student)]) == pytest.approx(0.6, abs=1e-3)


def test_same_seed_same_weights(ids):
    out = []
    for _ in range(2):
        dense, student = _pruned(ids)
        recover(student, ids, teacher=dense, max_steps=3, lr=1e-3, progress=False)
        out.append(student.model.layers[1].mlp.down_proj.weight.detach().clone())
    assert torch.equal(out[0], out[1])


@pytest.mark.parametrize("kwargs, match", [
    (dict(), "teacher="),
    (dict(options=RecoveryOptions(loss="ce"), teacher="t"), "drop teacher"),
    (dict(windows=torch.zeros(4, 8)), "LongTensor"),
    (dict(windows=torch.zeros(4, 1, dtype=torch.long), teacher="t"), ">= 2 tokens"),
    (dict(teacher="t", lr=-1.0), "lr"),
])
def test_bad_requests_are_refused_before_training(kwargs, match, ids):
    _, student = _pruned(ids)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    teacher = tiny_decoder("llama", seed=0) if kwargs.pop("teacher", None) else None
    windows = kwargs.pop("windows", ids)
    with pytest.raises(prunekit.PrunekitError, match=match):
        recover(student, windows, teacher=teacher, progress=False, **kwargs)
    assert all(torch.equal(student.state_dict()[k], v) for k, v in before.items())


def test_options_name_the_allowed_values():
    with pytest.raises(prunekit.PrunekitError, match="kl, ce"):
        RecoveryOptions(loss="mse")
    with pytest.raises(prunekit.PrunekitError, match="only applies"):
        RecoveryOptions(loss="ce", temperature=2.0)
    with pytest.raises(prunekit.PrunekitError, match="batch_size"):
        RecoveryOptions(batch_size=0)
