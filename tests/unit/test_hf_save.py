"""deploy.hf: pruned Hugging Face decoders saved for plain transformers, masks restored by prunekit."""
import json

import pytest
import torch

import prunekit
from prunekit.apply import masking
from prunekit.deploy import hf
from prunekit.errors import PrunekitError
from prunekit.zoo.llm import tiny_decoder

transformers = pytest.importorskip("transformers")


def tiny_llama(seed: int = 0):
    return tiny_decoder("llama", seed=seed, num_hidden_layers=2, tie_word_embeddings=True, pad_token_id=0)


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def prune_tiny(arch: str):
    """Magnitude 50%. GPT-2's layers are transformers' Conv1D (not nn.Linear, prunekit's default type), and its
    lm_head is tied to the token embedding: prune both, so the tied tensor carries a mask."""
    if arch == "llama":
        model = tiny_llama()
        prunekit.prune(model, 0.5)
    else:
        from transformers.pytorch_utils import Conv1D

        model = tiny_gpt2()
        prunekit.prune(model, 0.5, types=[Conv1D, "Linear"], include_classifier=True)
    return model.eval()


@pytest.fixture(params=["llama", "gpt2"])
def pruned(request):
    return prune_tiny(request.param)


IDS = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_plain_transformers_loads_the_same_model(pruned, tmp_path):
    folder = hf.save_pretrained(pruned, tmp_path / "out")
    assert {"config.json", "model.safetensors", hf.MASKS, hf.META} <= {p.name for p in folder.iterdir()}
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert not masking.is_masked(plain)
    torch.testing.assert_close(logits(plain), logits(pruned), atol=1e-5, rtol=0)
    weights = dict(plain.named_parameters(remove_duplicate=False))
    for name, keep in masking.masks(pruned).items():
        assert torch.equal(weights[name] == 0, dict(pruned.named_parameters(remove_duplicate=False))[name] == 0)
        assert bool((weights[name][~keep] == 0).all())
    doc = json.loads((folder / hf.META).read_text())
    assert doc["prunekit_version"] == prunekit.__version__
    assert set(doc["masks"]) == set(masking.masks(pruned))
    assert all(abs(v["sparsity"] - 0.5) < 0.05 for v in doc["masks"].values())


def test_tied_embedding_stays_tied_and_pruned(tmp_path):
    model = prune_tiny("gpt2")
    assert "lm_head.weight" in masking.masks(model)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(hf.save_pretrained(model, tmp_path / "g")))
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()
    assert torch.equal(plain.transformer.wte.weight, model.transformer.wte.weight)


def test_load_pretrained_restores_masks_and_enforce_keeps_zeros(pruned, tmp_path):
    plan_meta = {"criterion": "l1", "amount": 0.5}
    hf.save_pretrained(pruned, tmp_path / "m", plan=prunekit.Plan(meta=plan_meta), metadata={"note": "x"})
    back = hf.load_pretrained(tmp_path / "m")
    want, got = masking.masks(pruned), masking.masks(back)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(logits(back), logits(pruned), atol=1e-5, rtol=0)
    doc = hf.read_meta(tmp_path / "m")
    assert doc["plan"] == plan_meta and doc["metadata"] == {"note": "x"}

    back.train()
    opt = torch.optim.SGD(back.parameters(), lr=0.1)
    out = back(input_ids=IDS, labels=IDS)
    out.loss.backward()
    opt.step()
    params = dict(back.named_parameters(remove_duplicate=False))
    assert any(bool((params[k][~m] != 0).any()) for k, m in got.items())  # the step moved pruned weights
    masking.enforce(back)
    for name, keep in got.items():
        assert bool((params[name][~keep] == 0).all())
        assert bool((params[name][keep] != 0).any())


def test_tampered_masks_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = prune_tiny("llama")
    folder = hf.save_pretrained(model, tmp_path / "m")
    good = load_file(str(folder / hf.MASKS))
    name = "model.layers.0.mlp.up_proj.weight"
    keep = masking.masks(model)[name].reshape(-1)
    pruned_at, kept_at = int((~keep).nonzero()[0]), int(keep.nonzero()[0])

    def write(tensors):
        save_file(tensors, str(folder / hf.MASKS))

    def flip(bits, i):
        bits = bits.clone()
        bits[i // 8] ^= 1 << (7 - i % 8)
        return bits

    cases = {
        "fewer bytes": ({**good, name: good[name][:-1]}, "packed bytes"),
        "unknown name": ({**good, "model.layers.0.mlp.nope.weight": good[name].clone()}, "does not match"),
        "missing mask": ({k: v for k, v in good.items() if k != name}, "missing"),
        "kept weight marked pruned": ({**good, name: flip(good[name], kept_at)}, "not zero"),
        "pruned weight marked kept": ({**good, name: flip(good[name], pruned_at)}, "digest"),
        "wrong dtype": ({**good, name: good[name].to(torch.int16)}, "uint8"),
    }
    for what, (tensors, message) in cases.items():
        write(tensors)
        with pytest.raises(PrunekitError, match=message):
            hf.load_pretrained(folder)
    (folder / hf.MASKS).write_bytes(b"garbage")
    with pytest.raises(PrunekitError, match="corrupt"):
        hf.load_pretrained(folder)
    write(good)
    doc = json.loads((folder / hf.META).read_text())
    doc["masks"][name]["shape"] = [1, 2]
    (folder / hf.META).write_text(json.dumps(doc))
    with pytest.raises(PrunekitError, match="shape"):
        hf.load_pretrained(folder)


def test_revived_weights_are_refused_and_nothing_is_written(tmp_path):
    model = prune_tiny("llama")
    w = model.model.layers[0].self_attn.q_proj.weight
    keep = masking.masks(model)["model.layers.0.self_attn.q_proj.weight"]
    with torch.no_grad():
        w[~keep] = 1.0
    with pytest.raises(PrunekitError, match="not zero"):
        hf.save_pretrained(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_no_half_folder_and_keeps_the_old_one(tmp_path):
    model = prune_tiny("llama")
    folder = hf.save_pretrained(model, tmp_path / "m")
    before = sorted(p.name for p in folder.iterdir())

    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(model, tmp_path / "m", tokenizer=BrokenTokenizer())
    with pytest.raises(RuntimeError, match="disk full"):
        hf.save_pretrained(model, tmp_path / "new", tokenizer=BrokenTokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert sorted(p.name for p in folder.iterdir()) == before
    hf.load_pretrained(folder)


def test_tokenizer_is_saved_beside_the_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    folder = hf.save_pretrained(prune_tiny("llama"), tmp_path / "m", tokenizer=fast)
    again = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert again("hello world")["input_ids"] == [1, 2]


def test_plain_state_dict_loads_strictly_into_a_fresh_model(pruned):
    sd = prunekit.plain_state_dict(pruned)
    assert not any(k.endswith(masking.MASK_SUFFIX) for k in sd)
    torch.manual_seed(5)
    fresh = type(pruned)(pruned.config).eval()
    assert not masking.is_masked(fresh)
    fresh.load_state_dict(sd, strict=True)
    torch.testing.assert_close(logits(fresh), logits(pruned), atol=1e-6, rtol=0)


def test_plain_state_dict_zeroes_revived_entries_without_touching_the_model():
    model = prune_tiny("gpt2")
    name = "lm_head.weight"  # tied to transformer.wte.weight
    keep = masking.masks(model)[name]
    with torch.no_grad():
        model.lm_head.weight[~keep] = 3.0
    sd = masking.plain_state_dict(model)
    assert bool((sd[name][~keep] == 0).all()) and bool((sd["transformer.wte.weight"][~keep] == 0).all())
    assert sd[name].data_ptr() == sd["transformer.wte.weight"].data_ptr()  # still one tensor: HF stores it once
    assert bool((model.lm_head.weight[~keep] == 3.0).all())


def test_save_pretrained_needs_a_hf_model(tmp_path):
    with pytest.raises(TypeError, match="Hugging Face"):
        hf.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")


def test_load_pretrained_needs_prunekit_json(tmp_path):
    model = tiny_llama()
    model.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(FileNotFoundError, match="prunekit.json"):
        hf.load_pretrained(tmp_path / "plain")


def test_an_unpruned_model_round_trips_without_masks(tmp_path):
    model = tiny_llama().eval()
    folder = hf.save_pretrained(model, tmp_path / "dense")
    back = hf.load_pretrained(folder)
    assert not masking.is_masked(back) and hf.read_meta(folder)["masks"] == {}
    torch.testing.assert_close(logits(back), logits(model), atol=1e-5, rtol=0)


def test_extra_files_are_written_atomically_and_names_are_checked(tmp_path):
    import json as _json

    from prunekit.deploy.hf import save_pretrained
    from prunekit.zoo.llm import tiny_decoder

    out = save_pretrained(tiny_decoder("llama"), tmp_path / "m", files={"llm.json": _json.dumps({"a": 1})})
    assert _json.loads((out / "llm.json").read_text()) == {"a": 1}
    for bad in ("../x.json", "prunekit.json", "run.py"):
        with pytest.raises(prunekit.PrunekitError, match="plain .json"):
            save_pretrained(tiny_decoder("llama"), tmp_path / "n", files={bad: "{}"})
        assert not (tmp_path / "n").exists()
