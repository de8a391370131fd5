"""The LLM assets: the R serialization reader (hand-built XDR bytes), checksums, the Jane Austen texts and
SmolLM2 from the cache the install step filled, and the tiny random decoders."""
import gzip
import hashlib
import struct
import zlib

import pytest
import torch

from prunekit.errors import PrunekitError
from prunekit.zoo import assets, rdata
from prunekit.zoo.llm import TINY_ARCHS, load_smollm2, tiny_decoder

# ----------------------------------------------------------------------------- building XDR streams

UTF8, LATIN1, ASCII = 1 << 3, 1 << 2, 1 << 6
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def i32(*values):
    return struct.pack(f">{len(values)}i", *values)


def header(version=3):
    out = b"X\n" + i32(version, 0x040201, 0x030500)
    return out + i32(5) + b"UTF-8" if version == 3 else out


def char(s, level=UTF8, encoding="utf-8"):
    if s is None:
        return i32(9, -1)
    raw = s.encode(encoding)
    return i32(9 | (level << 12), len(raw)) + raw


def strsxp(*items, flags=0):
    return i32(16 | flags, len(items)) + b"".join(items)


def names_attr(*names, ref=None):
    """The attribute pairlist ``names = c(...)``; ``ref``: refer to the symbol read earlier instead."""
    tag = i32(1) + char("names", ASCII) if ref is None else i32((ref << 8) | 255)
    return i32(2 | HAS_TAG) + tag + strsxp(*(char(n, ASCII) for n in names)) + i32(254)


def test_rdata_string_vector_with_na_and_encodings():
    data = header() + strsxp(char("a", ASCII), char(None), char("café"), char("£20", LATIN1, "latin-1"),
                             char("plain", 0))
    v = rdata.unserialize(data)
    assert v.kind == "character" and v.values == ["a", None, "café", "£20", "plain"] and v.attributes == {}
    assert rdata.unserialize(header(version=2) + strsxp(char("x"))).values == ["x"]


def test_rdata_numeric_vectors():
    na = -(1 << 31)
    assert rdata.unserialize(header() + i32(13, 3, 7, na, -5)).values == [7, None, -5]
    assert rdata.unserialize(header() + i32(10, 3, 1, 0, na)).values == [True, False, None]
    real = rdata.unserialize(header() + i32(14, 2) + struct.pack(">2d", 1.5, -2.0))
    assert real.kind == "double" and real.values == [1.5, -2.0]
    assert rdata.unserialize(header() + i32(24, 3) + b"\x01\x02\x03").values == b"\x01\x02\x03"
    assert rdata.unserialize(header() + i32(254)) is None


def test_rdata_named_list_and_references():
    # list(a = 1L, b = list(x = "y")): attributes follow the elements, so the inner list's "names" symbol
    # is read first and the outer list's is a REFSXP to it
    inner = i32(19 | HAS_ATTR, 1) + strsxp(char("y")) + names_attr("x")
    data = header() + i32(19 | HAS_ATTR, 2) + i32(13, 1, 1) + inner + names_attr("a", "b", ref=1)
    v = rdata.unserialize(data)
    assert v.kind == "list" and v.names == ["a", "b"]
    named = v.named()
    assert named["a"].values == [1]
    assert named["b"].names == ["x"] and named["b"].values[0].values == ["y"]


def altrep_intseq(n, start=1, step=1):
    info = (i32(2) + i32(1) + char("compact_intseq", ASCII) + i32(2) + i32(1) + char("base", ASCII)
            + i32(2) + i32(13, 1, 13) + i32(254))
    return i32(238) + info + i32(14, 3) + struct.pack(">3d", n, start, step) + i32(254)


def test_rdata_compact_sequence_is_expanded_within_bounds():
    v = rdata.unserialize(header() + altrep_intseq(4, start=3))
    assert v.kind == "integer" and v.values == [3, 4, 5, 6]
    with pytest.raises(PrunekitError, match="bad compact_intseq"):
        rdata.unserialize(header() + altrep_intseq(rdata.MAX_SEQUENCE + 1))


def test_rdata_lazyload_db_round_trip(tmp_path):
    obj = header() + strsxp(char("It is a truth"), char("universally acknowledged"))
    rdb = struct.pack(">I", len(obj)) + zlib.compress(obj)
    pos = i32(13, 2, 0, len(rdb))
    index = (header() + i32(19 | HAS_ATTR, 3)
             + i32(19 | HAS_ATTR, 1) + pos + names_attr("book")  # variables
             + i32(19, 0)                                          # references
             + i32(10, 1, 1)                                       # compressed = TRUE
             + names_attr("variables", "references", "compressed"))
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    db = rdata.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")
    assert db["book"].values == ["It is a truth", "universally acknowledged"]
    with pytest.raises(PrunekitError, match="no object"):
        rdata.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb", names=["emma"])
    # a record that inflates past the length it declares is refused
    (tmp_path / "Rdata.rdb").write_bytes(struct.pack(">I", 10) + zlib.compress(obj))
    with pytest.raises(PrunekitError, match="inflates past"):
        rdata.read_lazyload_db(tmp_path / "Rdata.rdx", tmp_path / "Rdata.rdb")


@pytest.mark.parametrize("data, message", [
    (header() + strsxp(char("abc"))[:-1], "truncated"),
    (header() + i32(13, 2, 1), "needs at least"),                     # cut inside a vector
    (header() + i32(13, 0x7FFFFFFF), "length 2147483647 needs"),       # absurd length, nothing allocated
    (header() + i32(16, -1, 0x7FFFFFFF, 0), "needs at least"),         # absurd long-vector length
    (header() + i32(19, 0x10000000) + i32(254), "needs at least"),
    (header() + i32(3) + i32(254), "unsupported R object type CLOSXP"),
    (header() + i32(99), "unsupported R object type 99"),
    (header() + i32(4), "unsupported R object type ENVSXP"),
    (header() + i32((5 << 8) | 255), "reference 5 to an object not read yet"),
    (header() + i32(254, 254), "unexpected bytes"),
    (b"A\n" + header()[2:] + i32(254), "only 'X\\\\n' is read"),
    (header(version=4) + i32(254), "version 4"),
    (header() + strsxp(i32(13, 0)), "character vector holds a INTSXP"),
    (header() + strsxp(char("\xe9", 0, "latin-1")), "not valid utf-8"),
])
def test_rdata_refuses_bad_input(data, message):
    with pytest.raises(PrunekitError, match=message):
        rdata.unserialize(data)


def test_rdata_bounds_nesting():
    deep = header() + i32(19, 1) * (rdata.MAX_DEPTH + 5) + i32(254)
    with pytest.raises(PrunekitError, match="nested deeper"):
        rdata.unserialize(deep)


# ----------------------------------------------------------------------------- checksums and the cache

def test_checksum_refuses_and_deletes_a_tampered_file(tmp_path):
    path = tmp_path / "asset.bin"
    path.write_bytes(b"the real bytes")
    good = hashlib.sha256(b"the real bytes").hexdigest()
    assets.verify_sha256(path, good)
    assert path.exists()
    path.write_bytes(b"the real bytes, tampered")
    got = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PrunekitError, match=f"expected {good}, got {got}"):
        assets.verify_sha256(path, good)
    assert not path.exists()


def test_missing_assets_name_the_fetch_command(tmp_path):
    with pytest.raises(PrunekitError, match="python -m prunekit.zoo.assets fetch smollm2"):
        assets.smollm2_dir(tmp_path)
    with pytest.raises(PrunekitError, match="python -m prunekit.zoo.assets fetch austen"):
        assets.austen_text("emma", cache_dir=tmp_path)
    (tmp_path / "austen").mkdir()
    (tmp_path / "austen" / "emma.txt").write_text("not Emma")
    with pytest.raises(PrunekitError, match="SHA-256 mismatch.*fetch austen"):
        assets.austen_text("emma", cache_dir=tmp_path)


def test_austen_texts_are_real_prose():
    text = assets.austen_text("prideprejudice")
    assert len(text) > 500_000
    assert text.startswith("PRIDE AND PREJUDICE")
    assert ("It is a truth universally acknowledged, that a single man in possession\n"
            "of a good fortune, must be in want of a wife.") in text[:1000]
    assert "Elizabeth" in text and "Darcy" in text
    assert "£20,000" in assets.austen_text("mansfieldpark")  # non-ASCII survives as UTF-8
    for book in assets.AUSTEN_BOOKS:
        assert len(assets.austen_text(book)) > 400_000


def test_austen_unknown_book_lists_the_allowed_ones():
    with pytest.raises(PrunekitError) as e:
        assets.austen_text("middlemarch")
    assert "middlemarch" in str(e.value)
    assert all(book in str(e.value) for book in assets.AUSTEN_BOOKS)


def test_fetch_is_idempotent_when_verified(capsys):
    assert assets.main(["fetch", "austen"]) == 0
    assert "present and verified" in capsys.readouterr().err


# ----------------------------------------------------------------------------- decoders

@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_decoder_forward_and_seed(arch, one_thread):
    model = tiny_decoder(arch, seed=0)
    assert not model.training
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 256) and torch.isfinite(logits).all()
    same, other = tiny_decoder(arch, seed=0).state_dict(), tiny_decoder(arch, seed=1).state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert any(not torch.equal(v, other[k]) for k, v in model.state_dict().items())
    if arch != "gpt2":
        assert model.config.num_attention_heads == 4 and model.config.num_key_value_heads == 2


def test_tiny_decoder_overrides_and_refusals():
    assert tiny_decoder("gpt2", hidden_size=32, num_hidden_layers=2).config.n_embd == 32
    assert tiny_decoder("llama", num_key_value_heads=4).config.num_key_value_heads == 4
    with pytest.raises(PrunekitError, match="allowed: llama, qwen2, mistral, gpt2"):
        tiny_decoder("bert")
    with pytest.raises(PrunekitError, match="unknown llama config option"):
        tiny_decoder("llama", not_an_option=1)


@pytest.mark.slow
def test_smollm2_loads_and_generates(one_thread):
    # one thread: on the shared 2-core machine a second torch thread spin-waits (8 tokens took 12 s vs 0.5 s)
    model, tokenizer = load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size) == (30, 9, 3, 576)
    assert len(model.model.layers) == 30 and model.lm_head.weight is model.model.embed_tokens.weight
    ids = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    new = out[0, ids["input_ids"].shape[1]:]
    assert 0 < len(new) <= 8
    assert tokenizer.decode(new, skip_special_tokens=True).strip()
