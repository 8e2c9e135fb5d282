"""Generation through transformers, for every export layout (native arcee, TJUNLP remote code, MoE remote code).

The ground truth is a greedy loop over full forward passes without any cache. A model that ignores the cache
transformers hands it (5.24 renamed the keyword to `cache=`) still gives right forward logits but wrong
generations, and a tiny model can hide that behind degenerate argmaxes, so every step's logits are compared too.
"""
import builtins
import json

import pytest
import torch

from fuxi.checkpoints import export_to_hf, save_model
from fuxi.data_pipeline.tokenizer import TokenizerConfig, train_tokenizer
from fuxi.model.config import MoEConfig
from fuxi.model.upcycle import upcycle_model
from model_helpers import MULTILINGUAL_TEXT, tiny_model

pytestmark = pytest.mark.hf

NEW_TOKENS = 10
LAYOUTS = ["native", "tjunlp", "moe"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from fuxi.data_pipeline.corpus import bundled_corpus

    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    return train_tokenizer(bundled_corpus() / "train", out, TokenizerConfig(vocab_size=300, max_docs_per_language=2,
                                                               model_max_length=4096))


def _model(layout):
    dense = tiny_model(seed=3, pad_vocab_multiple=128)
    if layout != "moe":
        return dense
    moe = upcycle_model(dense, MoEConfig(num_experts=4, top_k=2, layers=[1], original_languages=["en"]), seed=2)
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if ".experts." in name or ".router." in name:
                p.add_(torch.randn_like(p) * 0.05)
    return moe.eval()


@pytest.fixture(scope="module", params=LAYOUTS)
def export(request, tmp_path_factory, tokenizer_dir):
    """(our model, export dir, loaded HF model, remote code?) for one layout."""
    from transformers import AutoModelForCausalLM

    layout = request.param
    tmp = tmp_path_factory.mktemp(f"gen_{layout}")
    ours = _model(layout)
    save_model(ours, tmp / "ours")
    export_to_hf(tmp / "ours", tmp / "hf", tokenizer_dir=tokenizer_dir,
                 layout=None if layout == "moe" else layout)
    remote = layout != "native"
    hf = AutoModelForCausalLM.from_pretrained(tmp / "hf", trust_remote_code=remote, local_files_only=True,
                                              dtype=torch.float32).eval()
    return ours, tmp / "hf", hf, remote


def _tokenizer(hf_dir, remote):
    from transformers import AutoTokenizer

    # The remote-code layouts: trust_remote_code=False loads the tokenizer without the prompt and without code.
    return AutoTokenizer.from_pretrained(hf_dir, local_files_only=True, **({"trust_remote_code": False} if remote
                                                                             else {}))


def _prompts(tokenizer, lengths=(3, 5, 7, 4, 6, 8)):
    return [tokenizer(text)["input_ids"][:n] for text, n in zip(MULTILINGUAL_TEXT, lengths)]


def _suppress(logits, vocab_size):
    logits = logits.clone()
    logits[..., vocab_size:] = float("-inf")  # generation_config's suppress_tokens: the vocab-padding rows
    return logits


def greedy_without_cache(hf, prompt: list[int], new_tokens: int, eos: int, vocab_size: int) -> list[int]:
    """The ground truth: at every step one full forward over the whole prefix, no cache anywhere."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            logits = hf(torch.tensor([ids]), use_cache=False).logits[0, -1]
            ids.append(int(_suppress(logits, vocab_size).argmax()))
            if ids[-1] == eos:
                break
    return ids


def _until_eos(ids: list[int], start: int, eos: int) -> list[int]:
    out = ids[:start]
    for token in ids[start:]:
        out.append(token)
        if token == eos:
            break
    return out


def test_cached_generate_equals_no_cache_greedy_loop(export):
    ours, hf_dir, hf, remote = export
    tokenizer = _tokenizer(hf_dir, remote)
    eos, vocab = hf.config.eos_token_id, ours.config.vocab_size
    for prompt in _prompts(tokenizer):
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
        truth = greedy_without_cache(hf, prompt, NEW_TOKENS, eos, vocab)
        assert _until_eos(out[0].tolist(), len(prompt), eos) == truth


def test_logits_seen_by_generate_equal_a_full_forward_at_every_step(export):
    ours, hf_dir, hf, remote = export
    tokenizer = _tokenizer(hf_dir, remote)
    for prompt in _prompts(tokenizer)[:3]:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                          min_new_tokens=NEW_TOKENS, output_logits=True, return_dict_in_generate=True)
        assert len(out.logits) == NEW_TOKENS
        with torch.no_grad():
            for step, step_logits in enumerate(out.logits):
                prefix = out.sequences[:, : len(prompt) + step]
                full = hf(prefix, use_cache=False).logits[:, -1]
                ours_full = ours(prefix).logits[:, -1]
                assert (step_logits - full).abs().max().item() <= 1e-4, f"step {step}"
                assert (step_logits - ours_full).abs().max().item() <= 1e-4, f"step {step} (ours)"


def test_batched_left_padded_generation_equals_each_prompt_alone(export):
    ours, hf_dir, hf, remote = export
    tokenizer = _tokenizer(hf_dir, remote)
    assert tokenizer.padding_side == "left"
    eos, vocab = hf.config.eos_token_id, ours.config.vocab_size
    prompts = _prompts(tokenizer)
    batch = tokenizer.pad({"input_ids": prompts}, padding=True, return_tensors="pt")
    out = hf.generate(**batch, max_new_tokens=NEW_TOKENS, do_sample=False)
    width = batch["input_ids"].shape[1]
    for row, prompt in enumerate(prompts):
        generated = _until_eos(prompt + out[row, width:].tolist(), len(prompt), eos)
        assert generated == greedy_without_cache(hf, prompt, NEW_TOKENS, eos, vocab), f"prompt {row}"


def test_text_generation_pipeline(export):
    from transformers import pipeline

    ours, hf_dir, hf, remote = export
    tokenizer = _tokenizer(hf_dir, remote)
    generator = pipeline("text-generation", model=hf, tokenizer=tokenizer, device="cpu")
    eos, vocab = hf.config.eos_token_id, ours.config.vocab_size
    for text in MULTILINGUAL_TEXT[:3]:
        prompt_text = tokenizer.decode(tokenizer(text)["input_ids"][:5])
        prompt = tokenizer(prompt_text)["input_ids"]
        result = generator(prompt_text, max_new_tokens=NEW_TOKENS, do_sample=False, return_full_text=False)
        truth = greedy_without_cache(hf, prompt, NEW_TOKENS, eos, vocab)
        full = tokenizer.decode(truth, skip_special_tokens=True)
        assert result[0]["generated_text"] == full[len(tokenizer.decode(prompt, skip_special_tokens=True)):]


def test_bf16_load_generates_and_tracks_fp32(export):
    from transformers import AutoModelForCausalLM

    ours, hf_dir, hf, remote = export
    bf16 = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=remote, local_files_only=True,
                                                dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    ids = torch.tensor([_prompts(_tokenizer(hf_dir, remote))[0]])
    with torch.no_grad():
        fp32 = hf(ids).logits
        low = bf16(ids).logits.float()
    assert (low - fp32).abs().max().item() <= 0.05 * fp32.abs().max().item()
    out = bf16.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4,
                        do_sample=False)
    assert out.shape == (1, ids.shape[1] + 4) and torch.equal(out[0, :ids.shape[1]], ids[0])
    assert int(out[0, ids.shape[1]]) == int(low[0, -1].argmax())  # generate's first token: the bf16 forward's


def test_save_pretrained_and_reload(export, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hf_dir, hf, remote = export
    hf.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "again", trust_remote_code=remote,
                                                 local_files_only=True, dtype=torch.float32)
    ids = torch.tensor([_prompts(_tokenizer(hf_dir, remote))[1]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, hf(ids).logits)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(again.generate(ids, **kwargs), hf.generate(ids, **kwargs))


def test_tokenizer_loads_without_prompt_and_agrees_with_the_configs(export, monkeypatch, tokenizer_dir):
    from tokenizers import Tokenizer

    ours, hf_dir, hf, remote = export

    def no_prompt(*args, **kwargs):
        raise AssertionError(f"transformers prompted: {args}")

    monkeypatch.setattr(builtins, "input", no_prompt)
    tokenizer = _tokenizer(hf_dir, remote)
    config = json.loads((hf_dir / "config.json").read_text())
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == config["eos_token_id"] == config["pad_token_id"] \
        == generation["eos_token_id"] == generation["pad_token_id"] == ours.config.eos_token_id
    assert tokenizer.bos_token_id == config["bos_token_id"] == generation["bos_token_id"]
    assert tokenizer.model_max_length == config["max_position_embeddings"] == ours.config.max_seq_len
    reference = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    for text in MULTILINGUAL_TEXT:
        assert tokenizer(text)["input_ids"] == reference.encode(text).ids
    short, long = sorted(MULTILINGUAL_TEXT[:2], key=lambda t: len(reference.encode(t).ids))
    n_short, n_long = len(reference.encode(short).ids), len(reference.encode(long).ids)
    assert n_short < n_long
    padded = tokenizer([short, long], padding=True)
    pad = n_long - n_short  # on the left, with the EOS id, masked out
    assert padded["attention_mask"] == [[0] * pad + [1] * n_short, [1] * n_long]
    assert padded["input_ids"][0] == [tokenizer.pad_token_id] * pad + reference.encode(short).ids
