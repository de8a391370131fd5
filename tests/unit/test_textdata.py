"""Generated sentences (prunekit.textdata) and the embedding agreement metrics; no model needed."""
import pytest
import torch

from prunekit.zoo import textdata as T


def test_sentences_are_deterministic_distinct_and_seeded():
    a, b = T.calibration_sentences(300, seed=0), T.calibration_sentences(300, seed=0)
    assert a == b and len(set(a)) == 300
    assert T.calibration_sentences(300, seed=1) != a
    assert T.heldout_pairs(50) == T.heldout_pairs(50)
    assert all(s[0].isupper() and s[-1] in ".?" for s in a)
    assert not any(" a a" in s or " a e" in s or " a o" in s for s in a)  # "an elderly", "an old"


def test_heldout_is_disjoint_from_calibration_in_frames_and_sentences():
    calib = set(T.calibration_sentences(500))
    held = T.heldout_sentences(150)
    assert len(held) == 300 and len(set(held)) == 300
    assert not calib & set(held)
    # the split is by frame (a fixed hash): the two generators never share a frame, whatever the seed
    import itertools
    import random
    calib_frames = set(itertools.islice(T._frames(random.Random(1), heldout=False), 300))
    held_frames = set(itertools.islice(T._frames(random.Random(1), heldout=True), 300))
    assert not calib_frames & held_frames
    assert all(T._is_heldout(f) for f in held_frames) and not any(T._is_heldout(f) for f in calib_frames)


def test_pairs_are_paraphrases_of_one_frame():
    for a, b in T.heldout_pairs(40):
        assert a != b
        # every slot took the other synonym, so the pair shares its structure, not its wording
        wa, wb = set(a.lower().strip(".").split()), set(b.lower().strip(".").split())
        assert len(wa ^ wb) >= 2


def test_spearman_exact_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert T.spearman(a, a * 10 + 3) == pytest.approx(1.0)
    assert T.spearman(a, -a) == pytest.approx(-1.0)
    assert T.spearman(a, torch.tensor([1.0, 3.0, 2.0, 4.0])) == pytest.approx(0.8)  # 1 - 6*2/(4*15)
    with pytest.raises(ValueError):
        T.spearman(a, a[:3])


def test_embedding_agreement_on_known_embeddings():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g)
    dense = torch.repeat_interleave(centers, 2, dim=0) + 0.05 * torch.randn(12, 16, generator=g)
    same = T.embedding_agreement(dense, dense.clone())
    assert same["cosine"] == pytest.approx(1.0) and same["spearman"] == pytest.approx(1.0)
    assert same["top1_agreement"] == 1.0 and same["paraphrase_top1"] == same["paraphrase_top1_dense"] == 1.0
    noisy = T.embedding_agreement(dense, dense + 2.0 * torch.randn(12, 16, generator=g))
    assert noisy["cosine"] < 0.9 and noisy["spearman"] < 0.95 and noisy["cosine_min"] <= noisy["cosine"]
    swapped = dense[torch.tensor([0, 2, 1, 3, 4, 5, 6, 7, 8, 9, 10, 11])]   # rows 1 and 2 exchanged
    bad = T.embedding_agreement(dense, swapped)
    assert bad["top1_agreement"] < 1.0 and bad["paraphrase_top1"] == pytest.approx(8 / 12)
    with pytest.raises(ValueError, match="even"):
        T.embedding_agreement(dense[:5], dense[:5])
