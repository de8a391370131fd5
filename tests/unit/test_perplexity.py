"""analysis.perplexity: fixed windows, perplexity checked by hand, greedy decoding speed."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.analysis.perplexity import PerplexityResult, generation_speed, perplexity, token_windows
from prunekit.errors import PrunekitError
from prunekit.zoo.llm import tiny_decoder

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    return tiny_decoder("llama", seed=seed, num_hidden_layers=2, tie_word_embeddings=True, pad_token_id=0)


def text_ids(n: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- windows
def test_token_windows_cut_fixed_non_overlapping_windows():
    ids = torch.arange(100)
    w = token_windows(ids, 16)
    assert w.shape == (6, 16) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), torch.arange(96))  # in order, no overlap, tail dropped
    assert token_windows(ids, 16, 40).shape == (2, 16)  # 40 tokens: truncated down to a multiple of 16
    assert token_windows(ids, 16, 48).shape == (3, 16)
    assert token_windows(ids.int(), 10).dtype == torch.long


@pytest.mark.parametrize("args, message", [
    ((torch.arange(10), 16), r"10 tokens do not fill one window of context 16"),
    ((torch.arange(100), 16, 8), r"8 tokens do not fill one window"),
    ((torch.arange(100), 16, 200), r"asked for 200 tokens but the text has only 100"),
    ((torch.arange(100).reshape(10, 10), 4), r"1-D"),
    ((torch.arange(100), 1), r"context must be an int >= 2"),
    ((torch.arange(100), 16, 0), r"n_tokens must be a positive int"),
])
def test_token_windows_errors_name_the_counts(args, message):
    with pytest.raises(PrunekitError, match=message):
        token_windows(*args)


def test_token_windows_refuse_float_ids():
    with pytest.raises(TypeError, match="integer token ids"):
        token_windows(torch.randn(100), 16)


# ---------------------------------------------------------------------------------------- perplexity
def by_hand(model, windows):
    nll, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0]
            for t in range(w.numel() - 1):  # token t + 1 predicted from tokens <= t
                logp = logits[t].double().log_softmax(-1)
                nll -= float(logp[w[t + 1]])
                count += 1
    return nll / count, count


def test_perplexity_matches_a_hand_computation():
    model = tiny_llama().eval()
    ids = text_ids(200)
    res = perplexity(model, ids, context=32, n_tokens=160)
    assert isinstance(res, PerplexityResult)
    assert (res.windows, res.context, res.tokens) == (5, 32, 5 * 31)
    nll, count = by_hand(model, token_windows(ids, 32, 160))
    assert res.tokens == count
    assert res.nll == pytest.approx(nll, rel=1e-5)
    assert res.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    # the same windows through cross_entropy's own mean
    w = token_windows(ids, 32, 160)
    with torch.no_grad():
        logits = model(input_ids=w).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 256), w[:, 1:].reshape(-1))
    assert res.nll == pytest.approx(float(ce), rel=1e-5)


def test_batch_size_and_2d_windows_give_the_same_result():
    model = tiny_llama().eval()
    ids = text_ids(300, seed=3)
    one = perplexity(model, ids, context=64)
    three = perplexity(model, ids, context=64, batch_size=3)
    given = perplexity(model, token_windows(ids, 64), batch_size=2)
    assert one.windows == three.windows == given.windows == 4
    assert three.nll == pytest.approx(one.nll, rel=1e-6) and given.nll == pytest.approx(one.nll, rel=1e-6)
    assert given.context == 64 and given.to_dict()["tokens"] == 4 * 63


class Uniform(nn.Module):
    """Every next token equally likely: perplexity must be the vocabulary size. Returns logits plainly,
    in train mode it would add noise (so the test also checks eval mode)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.scale = nn.Parameter(torch.ones(()))
        self.drop = nn.Dropout(0.5)

    def forward(self, input_ids):
        logits = self.drop(self.scale.expand(*input_ids.shape, self.vocab).clone() * 3.0)
        return SimpleNamespace(logits=logits)


@pytest.mark.parametrize("vocab", [2, 50, 1000])
def test_uniform_predictions_give_perplexity_equal_to_the_vocabulary(vocab):
    model = Uniform(vocab).train()
    res = perplexity(model, text_ids(130, vocab), context=16, batch_size=4)
    assert res.perplexity == pytest.approx(vocab, rel=1e-6)
    assert res.nll == pytest.approx(math.log(vocab), rel=1e-6)
    assert model.training and model.drop.training  # each flag restored
    assert model.scale.grad is None


def test_perplexity_takes_plain_tensors_and_tuples_as_outputs():
    class Plain(nn.Module):
        def __init__(self, tuple_out):
            super().__init__()
            self.emb = nn.Embedding(10, 10)
            self.tuple_out = tuple_out

        def forward(self, input_ids):
            return (self.emb(input_ids),) if self.tuple_out else self.emb(input_ids)

    ids = text_ids(40, 10)
    torch.manual_seed(0)
    a = Plain(False)
    b = Plain(True)
    b.load_state_dict(a.state_dict(), strict=False)
    assert perplexity(a, ids, context=8).nll == pytest.approx(perplexity(b, ids, context=8).nll)


def test_perplexity_errors():
    model = tiny_llama()
    with pytest.raises(PrunekitError, match="n_tokens applies"):
        perplexity(model, torch.zeros(2, 8, dtype=torch.long), n_tokens=8)
    with pytest.raises(PrunekitError, match="batch_size"):
        perplexity(model, text_ids(64), context=8, batch_size=0)
    with pytest.raises(PrunekitError, match="do not fill one window"):
        perplexity(model, text_ids(64), context=128)

    class Flat(nn.Module):
        def forward(self, input_ids):
            return torch.zeros(input_ids.shape[0], 5)

    with pytest.raises(PrunekitError, match=r"\(batch, tokens, vocab\)"):
        perplexity(Flat(), text_ids(64), context=8)


def test_perplexity_with_a_progress_bar(capsys):
    res = perplexity(tiny_llama(), text_ids(64), context=16, progress=True)
    assert res.windows == 4
    assert "perplexity" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ decoding speed
def test_generation_speed_decodes_exactly_new_tokens(monkeypatch):
    model = tiny_llama().train()
    model.generation_config.temperature = 0.7  # sampling settings greedy decoding must not trip over
    model.generation_config.top_p = 0.9
    calls = []
    real = model.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(out.shape[-1])
        return out

    monkeypatch.setattr(model, "generate", spy)
    res = generation_speed(model, text_ids(12, seed=4), new_tokens=6, repeat=3, warmup=1)
    assert set(res) == {"tokens_per_s", "spread", "new_tokens", "repeat"}
    assert res["new_tokens"] == 6 and res["repeat"] == 3
    assert res["tokens_per_s"] > 0 and res["spread"] >= 0
    assert calls == [18] * 4  # one warm-up and three timed calls, each 12 + 6 tokens
    assert model.training  # eval mode only while timing


def test_generation_speed_takes_a_batch_of_one_and_refuses_more():
    model = tiny_llama()
    res = generation_speed(model, text_ids(5)[None], new_tokens=3, repeat=1, warmup=0)
    assert res["new_tokens"] == 3
    with pytest.raises(PrunekitError, match="one prompt"):
        generation_speed(model, torch.zeros(2, 5, dtype=torch.long), new_tokens=3)
    with pytest.raises(PrunekitError, match="new_tokens"):
        generation_speed(model, text_ids(5), new_tokens=0)
