"""text.py: the offline CLIP tokenizer against OpenAI's reference BPE (open_clip's SimpleTokenizer, built from the
same bundled merges), the 77-token window with its truncation warning, and the text-encoder call."""
import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer
from open_clip.tokenizer import bytes_to_unicode as reference_bytes_to_unicode

from latentdiff import text

PROMPTS = [
    "a red circle on a blue background",
    "Ünïcödé — 猫 emoji 🐈, punctuation!? and   spaces\ttabs",
    "masterpiece, (best quality:1.2), 8k, f/1.8, $100 <lora:x>",
]


@pytest.fixture(scope="module")
def tokenizer():
    return text.build_clip_tokenizer()


def test_byte_table_is_gpt2s_reversible_map():
    table = text._bytes_to_unicode()
    assert table == reference_bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256


def test_bundled_bpe_file_is_open_clips(tmp_path, monkeypatch):
    path = text._bundled_bpe_path()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.is_file()
    assert path.parent == Path(list(importlib.util.find_spec("open_clip").submodule_search_locations)[0])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RuntimeError, match=r"^open_clip_torch is not installed; it provides the CLIP BPE vocabulary \(pip install open_clip_torch\)$"):
        text._bundled_bpe_path()


def test_tokenizer_matches_openai_clip_bpe(tokenizer):
    reference = SimpleTokenizer()
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>
        assert ids[1:-1] == reference.encode(prompt), prompt
    vocab = tokenizer.get_vocab()
    assert len(vocab) == 49408
    assert {k: v for k, v in vocab.items() if v < 49406} == {k: v for k, v in reference.encoder.items() if v < 49406}


def test_tokenizer_pads_with_endoftext_to_77_by_default_and_takes_sd2s_pad(tokenizer):
    assert tokenizer.model_max_length == text.MAX_LENGTH == 77
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 49407
    sd2 = text.build_clip_tokenizer(pad_token="!", model_max_length=64)
    assert sd2.pad_token == "!" and sd2.pad_token_id == 0 and sd2.model_max_length == 64


def test_read_tokenizer_takes_a_saved_tokenizer_then_settings_then_the_default(tokenizer, tmp_path):
    from latentdiff.checkpoints.single_file import SHIPPED_CONFIGS

    assert text.read_tokenizer(SHIPPED_CONFIGS / "sd2").pad_token == "!"  # from_config(configs/sd2) pads as SD 2.x does
    assert text.read_tokenizer(SHIPPED_CONFIGS / "sdxl", name="tokenizer_2").pad_token == "!"
    assert text.read_tokenizer(None, tmp_path).pad_token == "<|endoftext|>"  # nothing there: the standard tokenizer
    text.build_clip_tokenizer(pad_token="!", model_max_length=64).save_pretrained(tmp_path / "tokenizer")
    saved = text.read_tokenizer(tmp_path, SHIPPED_CONFIGS / "sd1")  # the first folder that has one wins
    assert (saved.pad_token, saved.model_max_length) == ("!", 64)
    assert saved("a red circle").input_ids == tokenizer("a red circle").input_ids


def test_tokenize_pads_every_prompt_to_the_window(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="latentdiff.text"):
        ids = text.tokenize(tokenizer, ["a cat", "", PROMPTS[0]])
    assert ids.shape == (3, 77) and ids.dtype == torch.int64
    assert ids[0, :4].tolist() == [49406, 320, 2368, 49407] and (ids[0, 4:] == 49407).all()
    assert ids[1, :2].tolist() == [49406, 49407]
    assert [r for r in caplog.records if r.name == "latentdiff.text"] == []


def n_tokens(tokenizer, prompt):
    return len(tokenizer(prompt).input_ids) - 2


@pytest.mark.parametrize("extra, dropped", [(0, None), (1, "elephant"), (2, "elephant zebra")])
def test_words_beyond_75_tokens_are_dropped_with_a_warning_naming_them(tokenizer, caplog, extra, dropped):
    prompt = " ".join(["cat"] * 75 + ["elephant", "zebra"][:extra])  # one token per word
    assert n_tokens(tokenizer, prompt) == 75 + extra
    with caplog.at_level(logging.WARNING, logger="latentdiff.text"):
        ids = text.tokenize(tokenizer, ["a dog", prompt])
    assert ids.shape == (2, 77) and ids[1, -1] == 49407 and (ids[1, 1:76] == ids[1, 1]).all()  # truncated to 75 cats
    mine = [r for r in caplog.records if r.name == "latentdiff.text"]
    messages = [r.getMessage() for r in mine]
    if dropped is None:
        assert messages == []
    else:
        assert messages == [f"prompt is longer than 75 tokens; these words were dropped: {dropped!r}"]
        assert mine[0].levelno == logging.WARNING


def test_encode_returns_the_last_hidden_state_on_the_encoders_device():
    seen = []

    class Encoder:
        device = torch.device("meta")  # ids must be sent to the encoder's device

        def __call__(self, input_ids):
            seen.append(input_ids)
            return (input_ids.float() * 2, "pooled")

    ids = torch.tensor([[49406, 320, 49407]])
    out = text.encode(Encoder(), ids)
    assert out.shape == (1, 3) and out.device == Encoder.device
    assert seen[0].device == Encoder.device and seen[0].dtype == torch.int64
