"""A1111 prompt syntax (latentdiff.prompts) and prompt encoding in 75-token chunks with weights and clip skip."""
import pytest
import torch

from latentdiff import text
from latentdiff.prompts import parse


@pytest.mark.parametrize("prompt, expected", [  # A1111's own examples (modules/prompt_parser.py)
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55), (", sun, ", 1.1),
      ("sky", 1.4641), (".", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("((red))", [("red", 1.21)]),
    ("(red:1.0) circle", [("red circle", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), ("BREAK", -1.0), ("a dog", 1.0)]),
    ("", [("", 1.0)]),
    ("a:b", [("a:b", 1.0)]),
])
def test_parse_matches_a1111(prompt, expected):
    got = parse(prompt)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected])


@pytest.fixture(scope="module")
def clip():
    from conftest import tiny_components

    _, _, text_encoder, tokenizer = tiny_components()
    return tokenizer, text_encoder


def _plain(clip, prompt):
    tokenizer, text_encoder = clip
    return text.encode(text_encoder, text.tokenize(tokenizer, [prompt]))[0]


@torch.no_grad()
def test_plain_prompts_encode_exactly_as_before_and_weight_one_changes_nothing(clip):
    tokenizer, text_encoder = clip
    plain, unit = text.encode_prompts(tokenizer, text_encoder, ["a red circle", "a (red:1.0) circle"])
    assert torch.equal(plain, _plain(clip, "a red circle"))
    assert torch.equal(unit, plain)


@torch.no_grad()
def test_weights_scale_token_embeddings_then_restore_the_mean(clip):
    tokenizer, text_encoder = clip
    (weighted,) = text.encode_prompts(tokenizer, text_encoder, ["a (red:1.5) circle"])
    z = _plain(clip, "a red circle")  # the same tokens: "a", "red", "circle"
    w = torch.ones(77, 1)
    w[2] = 1.5  # <start> a red …
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=0)


@torch.no_grad()
def test_long_prompts_and_break_are_encoded_in_75_token_chunks(clip):
    tokenizer, text_encoder = clip
    words = " ".join(["red"] * 100)
    ids, weights = text.chunk_ids(tokenizer, words)
    assert ids.shape == weights.shape == (2, 77)
    assert (ids[:, 0] == tokenizer.bos_token_id).all() and ids[0, 76] == tokenizer.eos_token_id
    assert ids[1, 26] == tokenizer.eos_token_id  # 25 tokens left for the second chunk
    (context,) = text.encode_prompts(tokenizer, text_encoder, [words])
    assert context.shape == (154, text_encoder.config.hidden_size)
    first = text.encode(text_encoder, ids[:1])[0]
    torch.testing.assert_close(context[:77], first, atol=0, rtol=0)
    ids, _ = text.chunk_ids(tokenizer, "a cat BREAK a dog")
    assert ids.shape == (2, 77) and ids[0, 3] == tokenizer.eos_token_id


@torch.no_grad()
def test_clip_skip_is_the_final_layer_norm_of_an_earlier_layer(clip):
    tokenizer, text_encoder = clip
    ids = text.tokenize(tokenizer, ["a red circle"])
    (one,) = text.encode_prompts(tokenizer, text_encoder, ["a red circle"], clip_skip=1)
    (two,) = text.encode_prompts(tokenizer, text_encoder, ["a red circle"], clip_skip=2)
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(two, text_encoder.final_layer_norm(hidden[-2])[0], atol=0, rtol=0)
    assert torch.equal(one, _plain(clip, "a red circle")) and not torch.allclose(one, two)
    with pytest.raises(ValueError, match="clip_skip must be between 1 and 2"):
        text.encode_prompts(tokenizer, text_encoder, ["x"], clip_skip=3)
