"""English sentences written here (templates + vocabulary), for calibrating and checking text models.

Nothing is downloaded: every sentence comes from a *frame* (who did what to
what, where, when) rendered by one of several templates with synonyms, so the
same frame gives paraphrases ("The old dog found the ball in the park
yesterday." / "Yesterday, the ball was discovered by the elderly hound at the
park."). Frames are split between calibration and held-out sets by a hash, so
the two share no frame and no sentence.

    calib = calibration_sentences(256)              # distinct sentences, many templates
    held = heldout_sentences(100)                   # 100 paraphrase pairs: items 2i and 2i+1
    batches, order = token_batches(model, calib)    # the model's own tokenizer, no padding
    emb = encode(model, batches, order)             # sentence embeddings in the original order
    embedding_agreement(dense_emb, pruned_emb)      # cosine, spearman, top1 agreement, paraphrase top1
"""
from __future__ import annotations

import random
import zlib
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from prunekit.errors import PrunekitError

# Every slot holds synonym sets: a paraphrase draws a different member of the same set.
SUBJECTS = [("dog", "hound"), ("child", "kid"), ("man", "gentleman"), ("woman", "lady"),
            ("teacher", "instructor"), ("doctor", "physician"), ("student", "pupil"), ("chef", "cook"),
            ("farmer", "grower"), ("musician", "performer"), ("neighbour", "neighbor"), ("pilot", "aviator"),
            ("worker", "labourer"), ("girl", "young girl"), ("boy", "young boy"), ("sailor", "seaman")]
ADJECTIVES = [("old", "elderly"), ("small", "little"), ("happy", "cheerful"), ("tired", "exhausted"),
              ("young", "youthful"), ("quiet", "silent"), ("big", "large"), ("angry", "furious"),
              ("clever", "smart"), ("busy", "occupied"), ("kind", "friendly"), ("nervous", "anxious")]
# (past, passive participle, base) per synonym
VERBS = [(("bought", "bought", "buy"), ("purchased", "purchased", "purchase")),
         (("fixed", "fixed", "fix"), ("repaired", "repaired", "repair")),
         (("found", "found", "find"), ("discovered", "discovered", "discover")),
         (("cleaned", "cleaned", "clean"), ("washed", "washed", "wash")),
         (("built", "built", "build"), ("constructed", "constructed", "construct")),
         (("chose", "chosen", "choose"), ("selected", "selected", "select")),
         (("watched", "watched", "watch"), ("observed", "observed", "observe")),
         (("sold", "sold", "sell"), ("traded away", "traded away", "trade away")),
         (("painted", "painted", "paint"), ("coloured", "coloured", "colour")),
         (("carried", "carried", "carry"), ("hauled", "hauled", "haul")),
         (("lost", "lost", "lose"), ("misplaced", "misplaced", "misplace")),
         (("examined", "examined", "examine"), ("inspected", "inspected", "inspect"))]
OBJECTS = [("car", "automobile"), ("house", "home"), ("picture", "photograph"), ("gift", "present"),
           ("bike", "bicycle"), ("phone", "telephone"), ("sofa", "couch"), ("boat", "vessel"),
           ("ball", "toy ball"), ("letter", "note"), ("map", "chart"), ("jacket", "coat"),
           ("lamp", "light"), ("basket", "hamper"), ("table", "desk"), ("ticket", "pass")]
PLACES = [("in the park", "at the park"), ("near the river", "by the river"),
          ("in the kitchen", "inside the kitchen"), ("at the market", "in the marketplace"),
          ("downtown", "in the city centre"), ("at the school", "in the schoolyard"),
          ("on the farm", "at the farm"), ("by the harbour", "near the port"),
          ("in the garden", "in the backyard"), ("at the station", "near the train station")]
TIMES = [("yesterday", "the day before"), ("this morning", "earlier today"),
         ("last night", "yesterday evening"), ("on Sunday", "over the weekend"),
         ("last week", "a week ago"), ("after lunch", "in the afternoon"),
         ("before dawn", "very early in the morning"), ("last summer", "during the summer")]

SLOTS = (SUBJECTS, ADJECTIVES, VERBS, OBJECTS, PLACES, TIMES)
Frame = Tuple[int, int, int, int, int, int]  # an index into each slot


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _words(frame: Frame, pick: Sequence[int]) -> Dict[str, Any]:
    """The frame's words, choosing synonym ``pick[i]`` (mod the set size) for slot i."""
    vals = [slot[i][p % len(slot[i])] for slot, i, p in zip(SLOTS, frame, pick)]
    subj, adj, verb, obj, place, time = vals
    return dict(subj=subj, adj=adj, past=verb[0], part=verb[1], base=verb[2], obj=obj, place=place, time=time,
                a_adj=_article(adj), a_obj=_article(obj))


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


# Templates that state the frame (paraphrases of each other) ...
STATEMENTS = [
    lambda w: f"The {w['adj']} {w['subj']} {w['past']} the {w['obj']} {w['place']} {w['time']}.",
    lambda w: f"{_cap(w['time'])}, the {w['obj']} was {w['part']} by the {w['adj']} {w['subj']} {w['place']}.",
    lambda w: f"{_cap(w['place'])}, {w['a_adj']} {w['adj']} {w['subj']} {w['past']} the {w['obj']} {w['time']}.",
    lambda w: f"It was the {w['adj']} {w['subj']} who {w['past']} the {w['obj']} {w['place']} {w['time']}.",
]
# ... and templates used for calibration only (more varied text, not paraphrases)
EXTRAS = [
    lambda w: f"Did the {w['adj']} {w['subj']} {w['base']} the {w['obj']} {w['place']}?",
    lambda w: f"The {w['subj']} did not {w['base']} the {w['obj']}, because it was {w['time']}.",
    lambda w: f"Everyone says the {w['subj']} will {w['base']} {w['a_obj']} {w['obj']} {w['place']} soon.",
    lambda w: f"After the {w['subj']} {w['past']} the {w['obj']}, the {w['adj']} crowd went home.",
    lambda w: f"Why would {w['a_adj']} {w['adj']} {w['subj']} {w['base']} the {w['obj']} {w['time']}?",
]


def _is_heldout(frame: Frame) -> bool:
    """A fixed hash split (1 frame in 4 is held out), the same for every seed."""
    return zlib.crc32(",".join(map(str, frame)).encode()) % 4 == 0


def _frames(rng: random.Random, heldout: bool):
    while True:
        frame = tuple(rng.randrange(len(slot)) for slot in SLOTS)
        if _is_heldout(frame) == heldout:
            yield frame


def _pick(rng: random.Random) -> List[int]:
    return [rng.randrange(2) for _ in SLOTS]


def calibration_sentences(n: int = 256, seed: int = 0) -> List[str]:
    """``n`` distinct sentences from calibration frames (statements and extra templates)."""
    if n < 1:
        raise PrunekitError(f"n={n} must be >= 1")
    rng = random.Random(f"calibration/{seed}")
    templates = STATEMENTS + EXTRAS
    out, seen = [], set()
    for frame in _frames(rng, heldout=False):
        s = templates[rng.randrange(len(templates))](_words(frame, _pick(rng)))
        if s not in seen:
            seen.add(s)
            out.append(s)
            if len(out) == n:
                return out
    raise AssertionError("unreachable")  # _frames is endless


def heldout_pairs(n: int = 100, seed: int = 0) -> List[Tuple[str, str]]:
    """``n`` paraphrase pairs from held-out frames: two templates, other synonyms, distinct frames."""
    if n < 1:
        raise PrunekitError(f"n={n} must be >= 1")
    rng = random.Random(f"heldout/{seed}")
    out, frames = [], set()
    for frame in _frames(rng, heldout=True):
        if frame in frames:
            continue
        frames.add(frame)
        ta, tb = rng.sample(range(len(STATEMENTS)), 2)
        pick = _pick(rng)
        a = STATEMENTS[ta](_words(frame, pick))
        b = STATEMENTS[tb](_words(frame, [p + 1 for p in pick]))  # every slot takes the other synonym
        out.append((a, b))
        if len(out) == n:
            return out
    raise AssertionError("unreachable")


def heldout_sentences(n_pairs: int = 100, seed: int = 0) -> List[str]:
    """The pairs flattened: items ``2i`` and ``2i + 1`` are paraphrases of each other."""
    return [s for pair in heldout_pairs(n_pairs, seed) for s in pair]


# ----------------------------------------------------------------------------- tokenising and encoding

def token_batches(model: Any, sentences: Sequence[str],
                  batch_size: int = 32) -> Tuple[List[dict], List[List[int]]]:
    """Batches of the model's own tokenizer output, each of sentences with the same token count.

    Equal lengths mean no padding: padded positions would still flow through the
    Linear layers and skew activation statistics and Hessians. Returns the
    batches and, for each, the indices of its sentences in ``sentences``.
    """
    if batch_size < 1:
        raise PrunekitError(f"batch_size={batch_size} must be >= 1")
    sentences = list(sentences)
    lengths = [len(ids) for ids in model.tokenizer(sentences)["input_ids"]]
    by_len: Dict[int, List[int]] = {}
    for i, n in enumerate(lengths):
        by_len.setdefault(n, []).append(i)
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 5 / older
    batches, order = [], []
    for n in sorted(by_len):
        idx = by_len[n]
        for k in range(0, len(idx), batch_size):
            chunk = idx[k:k + batch_size]
            batches.append(prep([sentences[i] for i in chunk]))
            order.append(chunk)
    return batches, order


def st_forward(model: Any, batch: dict) -> Any:
    """forward_fn for a SentenceTransformer: it adds its outputs to the dict it gets, so give it a copy."""
    return model(dict(batch))


@torch.no_grad()
def encode(model: Any, batches: Sequence[dict], order: Sequence[Sequence[int]]) -> torch.Tensor:
    """Sentence embeddings (float32), in the order of the sentences given to :func:`token_batches`."""
    n = sum(len(o) for o in order)
    out: Optional[torch.Tensor] = None
    for batch, idx in zip(batches, order):
        emb = st_forward(model, batch)["sentence_embedding"].float()
        if out is None:
            out = torch.empty(n, emb.shape[1])
        out[list(idx)] = emb
    if out is None:
        raise PrunekitError("no batches to encode")
    return out


# ----------------------------------------------------------------------------- agreement metrics

def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties broken by position; scores here are floats)."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() < 2:
        raise PrunekitError(f"spearman needs two 1-D tensors of the same length >= 2, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    ra = torch.argsort(torch.argsort(a.double(), stable=True)).double()
    rb = torch.argsort(torch.argsort(b.double(), stable=True)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _similarities(emb: torch.Tensor) -> torch.Tensor:
    e = torch.nn.functional.normalize(emb.double(), dim=1)
    return e @ e.T


def _nearest(sim: torch.Tensor) -> torch.Tensor:
    return sim.clone().fill_diagonal_(-float("inf")).argmax(dim=1)


def embedding_agreement(dense: torch.Tensor, pruned: torch.Tensor, paired: bool = True) -> Dict[str, float]:
    """How closely pruned embeddings follow dense ones (rows = the same sentences).

    ``cosine``/``cosine_min``: cosine of each sentence's pruned to dense embedding;
    ``spearman``: rank correlation of all pairwise similarities (i < j);
    ``top1_agreement``: fraction of sentences whose nearest neighbour is the same;
    with ``paired`` (rows 2i and 2i+1 are paraphrases), ``paraphrase_top1`` and
    ``paraphrase_top1_dense``: how often the nearest neighbour is the paraphrase.
    """
    if dense.shape != pruned.shape or dense.dim() != 2 or dense.shape[0] < 3:
        raise PrunekitError(f"need two (n >= 3, dim) embedding tensors of the same shape, got "
                         f"{tuple(dense.shape)} and {tuple(pruned.shape)}")
    cos = torch.nn.functional.cosine_similarity(dense.double(), pruned.double(), dim=1)
    sd, sp = _similarities(dense), _similarities(pruned)
    iu = torch.triu_indices(len(sd), len(sd), offset=1)
    nd, np_ = _nearest(sd), _nearest(sp)
    out = {"cosine": float(cos.mean()), "cosine_min": float(cos.min()),
           "spearman": spearman(sd[iu[0], iu[1]], sp[iu[0], iu[1]]),
           "top1_agreement": float((nd == np_).double().mean())}
    if paired:
        if len(dense) % 2:
            raise PrunekitError("paired=True needs an even number of rows (2i and 2i+1 are paraphrases)")
        partner = torch.arange(len(dense)) ^ 1
        out["paraphrase_top1"] = float((np_ == partner).double().mean())
        out["paraphrase_top1_dense"] = float((nd == partner).double().mean())
    return out
