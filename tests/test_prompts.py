"""A1111 prompt syntax (latentdiff.prompts) and prompt encoding in 75-token chunks with weights and clip skip."""
import logging
import re

import pytest
import torch

from latentdiff import text
from latentdiff.prompts import parse

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny encoders: more threads only oversubscribe the cores


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


def _tiny_clip_config(**overrides):
    """A CLIP text encoder config with the vocabulary and window of the real ones, 32 wide: built in milliseconds."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(**{**dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                                    num_attention_heads=4, max_position_embeddings=77, projection_dim=16), **overrides})


@pytest.fixture(scope="module")
def clip():
    """The standard tokenizer and a 2-layer CLIPTextModel (SD 1.x's encoder class)."""
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    tokenizer, text_encoder = text.build_clip_tokenizer(), CLIPTextModel(_tiny_clip_config(num_hidden_layers=2)).eval()
    # A trained CLIP's final LayerNorm has a bias. At init it is 0, so every token has mean 0, the context's mean is
    # exactly 0, and A1111's mean rescale would turn any weighted prompt into zeros.
    with torch.no_grad():
        text_encoder.final_layer_norm.bias.normal_(generator=torch.Generator().manual_seed(0))
    return tokenizer, text_encoder


@pytest.fixture(scope="module")
def sdxl_clip():
    """SDXL's two encoder classes, tiny (3 layers): a CLIPTextModel (ViT-L's place) and a CLIPTextModelWithProjection
    (ViT-bigG's, whose `text_embeds` is the pooled vector)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    return (text.build_clip_tokenizer(), CLIPTextModel(_tiny_clip_config()).eval(),
            CLIPTextModelWithProjection(_tiny_clip_config()).eval())


def _plain(clip, prompt):
    tokenizer, text_encoder = clip
    return text.encode(text_encoder, text.tokenize(tokenizer, [prompt]))[0]


@torch.no_grad()
def test_plain_prompts_encode_exactly_as_before_and_weight_one_changes_nothing(clip):
    tokenizer, text_encoder = clip
    plain, unit = text.encode_prompts(tokenizer, text_encoder, ["a red circle", "a (red:1.0) circle"])
    assert torch.equal(plain, _plain(clip, "a red circle"))
    assert torch.equal(unit, plain)


def test_a_context_of_mean_zero_is_weighted_without_the_mean_restore(clip):
    """An encoder fresh from init can give a context of mean 0, where A1111's rescale would be 0/0: plain prompts
    come out untouched, weighted ones weighted, never NaN or ∞ (seen with a tiny model, clip skip 2)."""
    class Encoder:  # the token ids and their negatives as features: a context of mean exactly 0
        device = torch.device("cpu")

        def __call__(self, input_ids):
            return (torch.stack([input_ids.float(), -input_ids.float()], -1),)

    tokenizer, _ = clip
    plain = text.encode(Encoder(), text.tokenize(tokenizer, ["a red circle"]))[0]
    (context,) = text.encode_prompts(tokenizer, Encoder(), ["a (red:1.0) circle"])
    assert torch.equal(context, plain)
    (weighted,) = text.encode_prompts(tokenizer, Encoder(), ["a (red:1.5) circle"])
    w = torch.ones(77, 1)
    w[2] = 1.5  # <start> a red …
    assert torch.equal(weighted, plain * w)


@torch.no_grad()
def test_weights_scale_token_embeddings_then_restore_the_mean(clip):
    tokenizer, text_encoder = clip
    (weighted,) = text.encode_prompts(tokenizer, text_encoder, ["a (red:1.5) circle"])
    z = _plain(clip, "a red circle")  # the same tokens: "a", "red", "circle"
    w = torch.ones(77, 1)
    w[2] = 1.5  # <start> a red …
    expected = z * w * (z.mean() / (z * w).mean())
    torch.testing.assert_close(weighted, expected, atol=1e-6, rtol=0)
    assert weighted.mean() == pytest.approx(z.mean().item(), rel=1e-5) and not torch.allclose(weighted, z, atol=1e-3)


def test_a_plain_prompt_is_one_chunk_tokenized_as_tokenize_does_with_unit_weights(clip):
    tokenizer, _ = clip
    ids, weights = text.chunk_ids(tokenizer, "a red circle")
    assert torch.equal(ids, text.tokenize(tokenizer, ["a red circle"]))
    assert torch.equal(weights, torch.ones(1, 77))  # (k, 77) like the ids, as for any other prompt


def test_a_negative_weight_weights_the_word_and_is_no_break(clip):
    tokenizer, _ = clip  # BREAK is the fragment ("BREAK", -1); "(red:-1)" is the word "red" at weight -1 (A1111)
    ids, weights = text.chunk_ids(tokenizer, "a (red:-1) circle")
    assert torch.equal(ids, text.tokenize(tokenizer, ["a red circle"]))
    assert weights[0, :5].tolist() == [1, 1, -1, 1, 1] and (weights[0, 5:] == 1).all()


def test_long_prompts_are_chunked_without_transformers_too_long_warning(monkeypatch, caplog):
    """transformers warns once per tokenizer that a sequence over 77 tokens "will result in indexing errors": false
    for prompts that are split into chunks."""
    tokenizer = text.build_clip_tokenizer()  # a fresh one: the warning is once per tokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        ids, _ = text.chunk_ids(tokenizer, " ".join(["red"] * 100))
    assert ids.shape == (2, 77) and [r.getMessage() for r in caplog.records] == []


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
    ids, weights = text.chunk_ids(tokenizer, "a cat BREAK a dog")  # each side of BREAK as a prompt of its own
    assert torch.equal(ids, text.tokenize(tokenizer, ["a cat", "a dog"])) and torch.equal(weights, torch.ones(2, 77))


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


@torch.no_grad()
def test_clip_skip_defaults_to_the_last_layer_and_reads_a_nested_text_model(clip, sdxl_clip):
    tokenizer, text_encoder = clip
    ids = text.tokenize(tokenizer, ["a red circle"])
    assert torch.equal(text.encode_hidden(text_encoder, ids), text.encode(text_encoder, ids))
    # CLIPTextModelWithProjection (and transformers 4's CLIPTextModel) keep the layers and final norm in .text_model
    _, _, projected = sdxl_clip
    skipped = text.encode_hidden(projected, ids, clip_skip=2)
    torch.testing.assert_close(skipped, text.encode_hidden(projected.text_model, ids, clip_skip=2), atol=0, rtol=0)
    hidden = projected(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(skipped, projected.text_model.final_layer_norm(hidden[-2]), atol=0, rtol=0)


@torch.no_grad()
def test_sdxl_context_is_an_earlier_layer_without_the_final_norm_and_pooled_the_projection(sdxl_clip):
    """diffusers' StableDiffusionXLPipeline.encode_prompt: hidden_states[-(clip_skip + 2)] with its clip_skip = k − 1
    (none: the penultimate layer, sgm's layer="penultimate"), and the projected text_embeds of text_encoder_2."""
    tokenizer, plain, projected = sdxl_clip
    ids = text.tokenize(tokenizer, ["a red circle", "a blue square"])
    out = projected(ids, output_hidden_states=True)
    context, pooled = text.encode_sdxl(projected, ids)
    assert torch.equal(context, out.hidden_states[-2]) and torch.equal(pooled, out.text_embeds)
    assert pooled.shape == (2, 16)
    context, _ = text.encode_sdxl(projected, ids, clip_skip=2)
    assert torch.equal(context, out.hidden_states[-3])
    context, pooled = text.encode_sdxl(plain, ids, clip_skip=2)  # the deepest allowed: the first layer's output
    assert torch.equal(context, plain(ids, output_hidden_states=True).hidden_states[1]) and pooled is None
    for k in (0, 3):  # k = 3 would read the token embeddings, before any layer
        with pytest.raises(ValueError, match=re.escape(
                f"clip_skip must be between 1 and 2 for SDXL (its text encoder has 3 layers), got {k}")):
            text.encode_sdxl(plain, ids, clip_skip=k)


@torch.no_grad()
def test_sdxl_prompts_are_chunked_and_weighted_and_pool_each_prompts_first_chunk(sdxl_clip):
    tokenizer, plain, projected = sdxl_clip
    prompts = [" ".join(["red"] * 100), "a (red:1.5) circle", "a cat BREAK a dog"]  # 2, 1 and 2 chunks
    contexts, pooled = text.encode_prompts_sdxl(tokenizer, projected, prompts)
    assert [c.shape for c in contexts] == [(154, 32), (77, 32), (154, 32)] and pooled.shape == (3, 16)
    for prompt, context, vector in zip(prompts, contexts, pooled):
        ids, weights = text.chunk_ids(tokenizer, prompt)
        z, chunk_pooled = text.encode_sdxl(projected, ids)
        w = weights.unsqueeze(-1)
        torch.testing.assert_close(context, (z * w * (z.mean() / (z * w).mean())).flatten(0, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(vector, chunk_pooled[0], atol=1e-6, rtol=0)  # A1111 pools the first chunk
    contexts, pooled = text.encode_prompts_sdxl(tokenizer, plain, prompts[1:], clip_skip=2)
    assert pooled is None
    torch.testing.assert_close(contexts[1], text.encode_sdxl(plain, text.chunk_ids(tokenizer, prompts[2])[0], 2)[0]
                               .flatten(0, 1), atol=0, rtol=0)


@torch.no_grad()
def test_prompts_are_encoded_on_the_encoders_device_in_its_dtype():
    """A half-precision encoder on another device (meta: shapes and dtypes only, nothing computed): the ids go to it,
    and the weights are applied there in its dtype."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = text.build_clip_tokenizer()
    with torch.device("meta"):
        encoders = [CLIPTextModel(_tiny_clip_config()).half(), CLIPTextModelWithProjection(_tiny_clip_config()).half()]
    seen = []
    for encoder in encoders:
        encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    prompts = ["a (red:1.5) circle", " ".join(["red"] * 100)]
    contexts = text.encode_prompts(tokenizer, encoders[0], prompts, clip_skip=2)
    sdxl_contexts, pooled = text.encode_prompts_sdxl(tokenizer, encoders[1], prompts)
    assert seen == [torch.device("meta")] * 2
    for c, length in zip(contexts + sdxl_contexts, [77, 154] * 2):
        assert (c.shape, c.dtype, c.device.type) == ((length, 32), torch.float16, "meta")
    assert (pooled.shape, pooled.dtype, pooled.device.type) == ((2, 16), torch.float16, "meta")
