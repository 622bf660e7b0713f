from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fromage.infer.bank import ImageBank
from fromage.infer.generation import (
    GenerationConfig,
    generate,
    greedy_captions,
    stream_generation,
)
from fromage.infer.scoring import log_likelihood
from fromage.model.fromage import FromageModel
from fromage.model.sequences import IGNORE
from tiny import make_opt_tokenizer, random_pixels, tiny_clip_tower, tiny_fromage, tiny_lm


def random_bank(model, n=12, seed=1):
    features = torch.randn(n, model.vision.dim, generator=torch.Generator().manual_seed(seed))
    return ImageBank(model.image_embeddings(features).detach(), [f"img{i}" for i in range(n)])


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_kv_cache_generation_equals_rerunning_the_prefix(family):
    model = tiny_fromage(family, n_visual_tokens=2, ret_layers=[-1, 1])
    bank = random_bank(model)
    prompt = ["a red", random_pixels(1)[0], "circle at the"]
    config = GenerationConfig(max_new_tokens=16, ret_scale=3.0)
    cached = generate(model, prompt, bank, config)
    reference = generate(model, prompt, bank, replace(config, use_cache=False))
    assert len(cached.token_ids) >= 8  # a real comparison, not two early stops
    assert cached.token_ids == reference.token_ids
    assert [p if isinstance(p, str) else [i.id for i in p] for p in cached.pieces] == [
        p if isinstance(p, str) else [i.id for i in p] for p in reference.pieces
    ]


def force_ret(model, token="a"):
    """Make the OPT model's final hidden state a constant direction u: [RET] then wins every
    step (its logit is 100 x u.u), and ``token`` wins whenever [RET] is not allowed."""
    u = F.normalize(
        torch.randn(model.lm.config.hidden_size, generator=torch.Generator().manual_seed(5)), dim=0
    )
    token_id = model.tokenizer(token, add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        final_norm = model.lm.model.decoder.final_layer_norm
        final_norm.weight.zero_()
        final_norm.bias.copy_(u)
        model.lm.get_input_embeddings().weight[token_id] = 50 * u
        model.ret_embedding.copy_(100 * u)
    return u, token_id


def test_ret_retrieves_interleaved_images_skipping_seen_and_excluded():
    model = tiny_fromage("opt")
    bank = random_bank(model)
    u, token_id = force_ret(model)
    query = F.normalize(model.ret_to_shared[0](u), dim=-1)
    ranking = [bank.ids[i] for i in (bank.embeddings @ query).argsort(descending=True)]

    out = generate(
        model,
        [random_pixels(1)[0], "a red"],
        bank,
        GenerationConfig(max_new_tokens=5, min_words=2),
        exclude_ids={ranking[0]},
    )
    assert out.token_ids == [token_id, token_id, model.ret_id, model.ret_id, model.ret_id]
    assert out.pieces[0] == "aa"
    images = out.pieces[1:]
    assert [[image.id for image in piece] for piece in images] == [
        [ranking[1]],
        [ranking[2]],
        [ranking[3]],
    ]
    scores = (bank.embeddings @ query).sort(descending=True).values
    assert images[0][0].score == pytest.approx(scores[1].item(), rel=1e-5)

    # a minimum score between the 2nd and 3rd best: the later [RET]s find nothing good enough
    threshold = (scores[1] + scores[2]).item() / 2
    strict = generate(
        model,
        [random_pixels(1)[0], "a red"],
        bank,
        GenerationConfig(max_new_tokens=5, min_words=2, min_score=threshold),
        exclude_ids={ranking[0]},
    )
    assert [[image.id for image in piece] for piece in strict.pieces[1:]] == [[ranking[1]], [], []]


def test_streaming_yields_the_reply_as_it_grows():
    model = tiny_fromage("opt")
    bank = random_bank(model)
    force_ret(model)
    config = GenerationConfig(max_new_tokens=5, min_words=2)
    snapshots = [
        [p if isinstance(p, str) else [i.id for i in p] for p in g.pieces]
        for g in stream_generation(model, ["a red"], bank, config)
    ]
    assert len(snapshots) == 5  # one per generated token
    assert snapshots[0] == ["a"] and snapshots[1] == ["aa"]
    assert len(snapshots[2]) == 2 and isinstance(snapshots[2][1], list)
    final = generate(model, ["a red"], bank, config)
    assert snapshots[-1] == [p if isinstance(p, str) else [i.id for i in p] for p in final.pieces]


def test_ret_is_never_generated_without_a_bank():
    model = tiny_fromage("opt")
    _, token_id = force_ret(model)
    out = generate(model, ["a red"], config=GenerationConfig(max_new_tokens=4))
    assert out.token_ids == [token_id] * 4 and out.pieces == ["aaaa"]


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_batched_greedy_captions_equal_one_by_one_generation(family):
    model = tiny_fromage(family, input_prompt="there is")  # read after the image, as trained
    images = list(random_pixels(5))
    config = GenerationConfig(max_new_tokens=8)
    one_by_one = [
        "".join(generate(model, [image, "there is"], None, config).pieces) for image in images
    ]
    assert greedy_captions(model, images, 8) == one_by_one
    assert any(len(caption) > 4 for caption in one_by_one)  # not all early stops


def test_generation_stops_at_newline():
    model = tiny_fromage("opt")
    bank = random_bank(model)
    force_ret(model, token="\n")
    config = GenerationConfig(max_new_tokens=6, min_words=3)
    out = generate(model, ["a red"], bank, config)
    assert out.token_ids == [] and out.pieces == []
    newline = model.tokenizer("\n", add_special_tokens=False).input_ids[0]
    multiline = generate(model, ["a red"], bank, replace(config, stop_at_newline=False))
    assert multiline.token_ids[:3] == [newline] * 3 and len(multiline.token_ids) == 6


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    model = tiny_fromage("llama")
    prompt = ["a blue star"]
    greedy = generate(model, prompt, config=GenerationConfig(max_new_tokens=10))
    nucleus = generate(
        model, prompt, config=GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=1e-6)
    )
    assert nucleus.token_ids == greedy.token_ids
    runs = [
        generate(
            model,
            prompt,
            config=GenerationConfig(max_new_tokens=10, temperature=1.5),
            generator=torch.Generator().manual_seed(s),
        )
        for s in (0, 0, 1)
    ]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


def opt_like_fromage(n_visual_tokens: int = 3) -> FromageModel:
    """A tiny OPT whose tokenizer adds BOS (``</s>``, id 2) as ``facebook/opt-*``'s does."""
    torch.manual_seed(0)
    tokenizer = make_opt_tokenizer()
    lm = tiny_lm("opt", vocab_size=len(tokenizer) + 1)  # + [RET]
    return FromageModel(lm, tokenizer, tiny_clip_tower(), n_visual_tokens=n_visual_tokens)


# The token ids of ``[caption, image, caption[RET]]`` with an OPT-like tokenizer (BOS = 2,
# [RET] = 322 after its 322 tokens, 3 visual tokens): BOS before every caption, as the
# paper's VIST evaluation tokenized each caption, or once, as its generation API did.
RED, STAR = [68, 224, 266, 71], [264, 81, 224, 68, 303]  # "a red", " then a star"
EXPECTED_IDS = {
    "every_piece": [2, *RED] + [IGNORE] * 3 + [2, *STAR, 322],
    "first_piece": [2, *RED] + [IGNORE] * 3 + [*STAR, 322],
}


@pytest.mark.parametrize("text_prefix", ["every_piece", "first_piece"])
def test_interleaved_prompt_token_ids_with_a_bos_tokenizer(text_prefix):
    model = opt_like_fromage(n_visual_tokens=3)
    tok = model.tokenizer
    assert tok("a red").input_ids == [2, *RED] and model.ret_id == 322
    assert tok(" then a star", add_special_tokens=False).input_ids == STAR
    image = random_pixels(1)[0]
    batch = model.embed_interleaved(
        [["a red", image, " then a star[RET]"], ["a cross"]], text_prefix=text_prefix
    )
    expected = EXPECTED_IDS[text_prefix]
    n = len(expected)
    assert batch.labels[0, :n].tolist() == expected and batch.mask[0].sum() == n
    assert batch.mask[1].sum() == 1 + len(tok("a cross", add_special_tokens=False).input_ids)
    visual = model.visual_tokens(model.image_features(image[None]))[0]  # (3, d_emb)
    assert torch.allclose(batch.embeds[0, 5:8], visual, atol=1e-5)
    assert torch.equal(batch.embeds[0, 8:n], model.embed_ids(torch.tensor(expected[8:])))


def test_unknown_text_prefix_is_a_clear_error():
    with pytest.raises(ValueError, match="text_prefix must be one of"):
        tiny_fromage("opt").embed_interleaved([["a"]], text_prefix="every")


def test_wrong_prompt_item_type_is_a_clear_error():
    model = tiny_fromage("opt")
    with pytest.raises(TypeError, match="prompt items must be"):
        model.embed_interleaved([["a", 3.0]])


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_log_likelihood_matches_the_lm(family):
    model = tiny_fromage(family, n_visual_tokens=2)
    context = [random_pixels(1)[0], "a red"]
    continuations = [" circle", " star at the top"]
    scores = log_likelihood(model, context, continuations)

    prompt = model.embed_interleaved([context])
    for continuation, score in zip(continuations, scores, strict=True):
        ids = torch.tensor(model.tokenizer(continuation, add_special_tokens=False).input_ids)
        embeds = torch.cat([prompt.embeds[0], model.embed_ids(ids)])[None]
        out = model.lm(inputs_embeds=embeds, output_hidden_states=True)
        ret = out.hidden_states[-1] @ (
            model.ret_output if family == "llama" else model.ret_embedding
        )
        log_probs = torch.cat([out.logits[..., : model.ret_id], ret[..., None]], -1).log_softmax(
            -1
        )[0]
        start = prompt.embeds.shape[1]
        expected = sum(log_probs[start + j - 1, t] for j, t in enumerate(ids.tolist()))
        assert score.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize(
    "setting", [{"max_new_tokens": 0}, {"top_p": 0.0}, {"temperature": -1.0}, {"images_per_ret": 0}]
)
def test_generation_settings_no_reply_can_use_are_refused_by_name(setting):
    (name,) = setting
    with pytest.raises(ValueError, match=rf"^{name}=.*: it must be"):
        GenerationConfig(**setting)
