import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from fromage.model.fromage import FromageModel
from fromage.model.objectives import contrastive_loss
from fromage.model.sequences import IGNORE, concat_pairs
from fromage.model.tokens import tokenize_captions
from tiny import (
    CAPTIONS,
    LLAMA_SHAPE,
    make_opt_tokenizer,
    make_tokenizer,
    tiny_clip_tower,
    tiny_fromage,
    tiny_lm,
)

TRAINABLE = {"image_to_lm", "image_to_shared", "ret_to_shared", "ret_embedding", "logit_scale"}


def batch(model, n=4, max_len=24, seed=0):
    """Distinct pooled features (random pixels look alike to a random tower) and captions."""
    captions = CAPTIONS[seed * 7 : seed * 7 + n]
    ids, mask = tokenize_captions(model.tokenizer, captions, model.ret_id, max_len)
    features = torch.randn(n, model.vision.dim, generator=torch.Generator().manual_seed(seed))
    return features, ids, mask


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
def test_only_the_projections_and_ret_are_trainable(family):
    k, shared, layers = 2, 16, [-1, 1]
    model = tiny_fromage(family, n_visual_tokens=k, shared_dim=shared, ret_layers=layers)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = TRAINABLE | ({"ret_output"} if family == "llama" else set())
    assert {n.split(".")[0] for n in trainable} == expected
    assert not any(p.requires_grad for p in model.lm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())

    d_vis, d_emb, d_hid = model.vision.dim, 32, 32
    untied = d_hid if family == "llama" else 0
    formula = (
        (d_vis * k * d_emb + k * d_emb)  # image_to_lm
        + (d_vis * shared + shared)  # image_to_shared
        + len(layers) * (d_hid * shared + shared)  # ret_to_shared
        + d_emb
        + untied
        + 1  # [RET] in (and out when untied), logit_scale
    )
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == formula
    assert set(model.trainable_state_dict()) == trainable


def test_backbones_stay_in_eval_mode():
    model = tiny_fromage("opt").train()
    assert model.training and model.image_to_lm.training
    assert not any(m.training for m in model.lm.modules())
    assert not any(m.training for m in model.vision.modules())


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_gradients_reach_trainable_parts_and_never_frozen_weights(family):
    model = tiny_fromage(family, ret_layers=[-1, 1]).train()
    losses = model(*batch(model), concat_captions=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    losses.total().backward()
    optimizer.step()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    frozen_with_state = [
        p for p in model.parameters() if not p.requires_grad and p in optimizer.state
    ]
    assert not frozen_with_state
    assert len(optimizer.state) == sum(1 for p in model.parameters() if p.requires_grad)


def test_ret_vector_is_renormalised_to_mean_embedding_norm():
    model = tiny_fromage("opt")
    vocabulary = model.lm.get_input_embeddings().weight[: model.ret_id]
    with torch.no_grad():
        model.ret_embedding.mul_(3.0)
    model.normalize_ret_embedding()
    assert model.ret_embedding.norm().item() == pytest.approx(
        vocabulary.norm(dim=-1).mean().item(), rel=1e-5
    )


def reference_logits(model, embeds, mask):
    """Logits the slow way: the LM's own full forward, [RET] column computed by hand."""
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    ret_logit = out.hidden_states[-1] @ model.ret_embedding
    return torch.cat([out.logits[..., : model.ret_id], ret_logit[..., None]], -1)


def test_caption_loss_is_ce_over_bos_and_caption_tokens():
    """As the release trained captioning: BOS is predicted from the image, the prompt is
    never a target, and the final [RET] is not even an input."""
    k, prompt = 2, "a picture of"
    model = tiny_fromage("opt", n_visual_tokens=k, input_prompt=prompt)
    features, ids, mask = batch(model, n=3, max_len=9)
    mask[2, 4:] = 0  # a short row: padding must not be a target
    ids[2, 3] = model.ret_id
    n_prompt = len(model.tokenizer(prompt, add_special_tokens=False).input_ids)

    # hand-built sequence: [v1 v2] BOS prompt caption... ([RET] and padding masked out)
    rows = []
    for b in range(3):
        n = int(mask[b].sum()) - 1  # without [RET]
        text = [ids[b, 0].item(), *model.prompt_ids.tolist(), *ids[b, 1:].tolist()]
        rows.append((text, n + n_prompt))
    text_ids = torch.tensor([r[0] for r in rows])
    embeds = torch.cat([model.visual_tokens(features), model.embed_ids(text_ids)], 1)
    full_mask = torch.cat(
        [
            torch.ones(3, k, dtype=torch.long),
            torch.tensor([[1] * n + [0] * (len(t) - n) for t, n in rows]),
        ],
        1,
    )
    log_probs = reference_logits(model, embeds, full_mask).log_softmax(-1)
    terms = []
    for b, (text, n) in enumerate(rows):
        # targets: BOS (from the last visual token), then the caption tokens after the prompt
        for j in [0, *range(1 + n_prompt, n)]:
            terms.append(log_probs[b, k + j - 1, text[j]])
    expected = -torch.stack(terms).mean()

    captions = model.caption_inputs(features, ids, mask)
    assert captions.mask.sum(1).tolist() == [k + n for _, n in rows]
    hidden = model.run_lm(captions.embeds, captions.mask).last_hidden_state
    assert model.mean_nll(hidden, captions.labels).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    assert (captions.labels != IGNORE).sum() == len(terms)


def test_retrieval_lm_loss_includes_ret():
    model = tiny_fromage("llama")
    features, ids, mask = batch(model, n=2)
    losses = model(features, ids, mask)
    embeds = model.embed_ids(ids)
    out = model.lm(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    ret_logit = out.hidden_states[-1] @ model.ret_output
    log_probs = torch.cat([out.logits[..., : model.ret_id], ret_logit[..., None]], -1).log_softmax(
        -1
    )
    terms = [log_probs[b, t - 1, ids[b, t]] for b in range(2) for t in range(1, int(mask[b].sum()))]
    assert losses.retrieval_lm.item() == pytest.approx(-torch.stack(terms).mean().item(), rel=1e-5)


def test_concatenated_pairs_hold_both_captions_in_order():
    model = tiny_fromage("opt", n_visual_tokens=2)
    features, ids, mask = batch(model, n=3)
    mask[0, 5:] = 0
    singles = model.caption_inputs(features, ids, mask)
    pairs = concat_pairs(singles)
    assert len(pairs) == 2
    lengths = singles.mask.sum(1)
    assert pairs.mask.sum(1).tolist() == [int(lengths[0] + lengths[1]), int(lengths[2])]
    a, b = singles.mask[0] == 1, singles.mask[1] == 1
    n = int(lengths[0] + lengths[1])
    assert torch.equal(pairs.embeds[0, :n], torch.cat([singles.embeds[0][a], singles.embeds[1][b]]))
    assert torch.equal(pairs.labels[0, :n], torch.cat([singles.labels[0][a], singles.labels[1][b]]))
    assert (pairs.labels[0, n:] == IGNORE).all() and (pairs.mask[0, n:] == 0).all()
    # the odd row stays alone, and the number of caption targets is unchanged
    assert torch.equal(pairs.embeds[1, : int(lengths[2])], singles.embeds[2][: int(lengths[2])])
    assert (pairs.labels != IGNORE).sum() == (singles.labels != IGNORE).sum()


def two_captions_with_an_opt_like_tokenizer():
    """A tiny OPT model whose tokenizer adds BOS, two tokenized captions and two images'
    features: (tokenizer, model, captions, ids, mask, features (2, d_vis))."""
    torch.manual_seed(0)
    tokenizer = make_opt_tokenizer()
    model = FromageModel(
        tiny_lm("opt", vocab_size=len(tokenizer) + 1), tokenizer, tiny_clip_tower(), 2
    )
    captions = ["a red circle", "a blue star at the top"]
    ids, mask = tokenize_captions(tokenizer, captions, model.ret_id, max_len=24)
    features = torch.randn(2, model.vision.dim, generator=torch.Generator().manual_seed(0))
    return tokenizer, model, captions, ids, mask, features


def test_concatenated_captions_are_laid_out_as_the_release_did():
    """``[v_a] BOS caption_a [v_b] BOS caption_b``, BOS from an OPT-like tokenizer: the first
    caption's [RET] is no input between them, and BOS and every caption token are targets."""
    tokenizer, model, captions, ids, mask, features = two_captions_with_an_opt_like_tokenizer()
    pair = concat_pairs(model.caption_inputs(features, ids, mask))
    a, b = (tokenizer(c).input_ids for c in captions)  # each [2, ...]: BOS first
    assert a[0] == b[0] == 2
    expected = [IGNORE] * 2 + a + [IGNORE] * 2 + b
    n = len(expected)
    assert pair.labels[0].tolist() == expected and pair.mask[0].tolist() == [1] * n
    visual = model.visual_tokens(features)  # (2, 2, d_emb)
    assert torch.equal(pair.embeds[0, :2], visual[0])
    assert torch.equal(pair.embeds[0, 2 + len(a) : 4 + len(a)], visual[1])
    text = pair.embeds[0, [i for i, label in enumerate(expected) if label != IGNORE]]
    assert torch.equal(text, model.embed_ids(torch.tensor(a + b)))


def test_ret_in_caption_keeps_each_captions_ret_as_an_input_that_is_no_target():
    """``loss.ret_in_caption``: ``[v_a] BOS caption_a [RET] [v_b] BOS caption_b [RET]``,
    the [RET]s inputs between the pairs but never targets; and the step's caption loss on
    concatenated pairs is the mean over the same targets, which now read the separator."""
    tokenizer, model, captions, ids, mask, features = two_captions_with_an_opt_like_tokenizer()
    pair = concat_pairs(model.caption_inputs(features, ids, mask, ret_input=True))
    a, b = (tokenizer(c).input_ids for c in captions)
    expected = [IGNORE] * 2 + a + [IGNORE] + [IGNORE] * 2 + b + [IGNORE]
    n = len(expected)
    assert pair.labels[0].tolist() == expected and pair.mask[0].tolist() == [1] * n
    ret = model.embed_ids(torch.tensor([model.ret_id]))[0]
    assert torch.equal(pair.embeds[0, 2 + len(a)], ret) and torch.equal(pair.embeds[0, -1], ret)
    assert torch.equal(pair.embeds[0, 3 + len(a) : 5 + len(a)], model.visual_tokens(features)[1])
    kept, dropped = (
        model(features, ids, mask, concat_captions=True, ret_in_caption=flag)
        for flag in (True, False)
    )
    assert kept.caption_tokens == dropped.caption_tokens
    assert not torch.isclose(kept.caption, dropped.caption)  # the separator is read


def direct_infonce(t, v, scale):
    n = len(t)
    sims = [[scale * float(v[i].detach() @ t[j].detach()) for j in range(n)] for i in range(n)]

    def ce(rows):
        return sum(-rows[i][i] + math.log(sum(math.exp(x) for x in rows[i])) for i in range(n)) / n

    return (ce(sims) + ce([list(col) for col in zip(*sims, strict=False)])) / 2


def test_contrastive_loss_matches_direct_computation():
    model = tiny_fromage("opt")
    features, ids, mask = batch(model, n=4)
    losses = model(features, ids, mask)
    out = model.run_lm(model.embed_ids(ids), mask)
    t = F.normalize(
        model.ret_to_shared[0](out.last_hidden_state[torch.arange(4), mask.sum(1) - 1]), dim=-1
    )
    v = F.normalize(model.image_to_shared(features), dim=-1)
    expected = direct_infonce(t, v, model.logit_scale.exp().item())
    assert losses.contrastive.item() == pytest.approx(expected, rel=1e-5)


def test_gathered_contrastive_uses_the_global_batch_and_keeps_local_gradients():
    torch.manual_seed(0)
    local_t = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    local_v = F.normalize(torch.randn(3, 8), dim=-1).requires_grad_()
    other_t, other_v = (
        F.normalize(torch.randn(3, 8), dim=-1),
        F.normalize(torch.randn(3, 8), dim=-1),
    )
    others = {id(local_t): other_t, id(local_v): other_v}

    def gather(x):  # rank 1 of 2: the other rank's rows first, without gradient
        return torch.cat([others[id(x)].detach(), x])

    scale = torch.tensor(2.0)
    out = contrastive_loss(local_t, local_v, scale, gather)
    expected = direct_infonce(
        torch.cat([other_t, local_t]), torch.cat([other_v, local_v]), math.exp(2.0)
    )
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    out.loss.backward()
    assert local_t.grad.abs().sum() > 0 and local_v.grad.abs().sum() > 0


@pytest.mark.parametrize("family", ["opt", "llama"])
def test_a_few_steps_of_training_lower_the_loss(family):
    model = tiny_fromage(family, n_visual_tokens=2).train()
    features, ids, mask = batch(model, n=8, seed=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    history = []
    for step in range(40):
        losses = model(features, ids, mask, concat_captions=step % 2 == 1)
        optimizer.zero_grad()
        losses.total().backward()
        optimizer.step()
        model.normalize_ret_embedding()
        history.append(
            (losses.caption.item(), losses.retrieval_lm.item(), losses.contrastive.item())
        )
    (caption_0, ret_lm_0, contrastive_0), (caption, ret_lm, contrastive) = history[0], history[-1]
    assert caption < 0.85 * caption_0
    assert ret_lm < 0.97 * ret_lm_0  # only the [RET] logit can move this one
    assert contrastive < 0.1 * contrastive_0


@pytest.mark.parametrize("family", ["opt", "llama", "gpt2"])
@pytest.mark.parametrize("concat", [False, True])
def test_packed_single_pass_gives_the_losses_of_two_padded_passes(family, concat):
    model = tiny_fromage(family, n_visual_tokens=2, ret_layers=[-1, 1])
    ids, mask = tokenize_captions(model.tokenizer, [*CAPTIONS[:5], "a red"], model.ret_id, 16)
    features = torch.randn(6, model.vision.dim, generator=torch.Generator().manual_seed(0))
    model.pack_sequences = True
    packed = model(features, ids, mask, concat_captions=concat)
    model.pack_sequences = False
    padded = model(features, ids, mask, concat_captions=concat)
    for name in ("caption", "retrieval_lm", "contrastive"):
        assert getattr(packed, name).item() == pytest.approx(getattr(padded, name).item(), rel=1e-5)
    assert torch.allclose(packed.text_embeddings, padded.text_embeddings, atol=1e-5)


def test_runs_as_deepspeed_bf16_leaves_it():
    """DeepSpeed broadcasts each parameter viewed as bytes (impossible for a 0-dim one) and,
    in bf16 mode, casts every parameter and buffer to bf16, trainable maps included."""
    model = tiny_fromage("opt")
    assert all(p.dim() >= 1 for p in model.parameters())
    features, ids, mask = batch(model)
    model.to(torch.bfloat16)
    losses = model(features.to(torch.bfloat16), ids, mask, concat_captions=True)
    losses.total().backward()
    assert torch.isfinite(losses.total())
    assert model.image_to_lm.weight.grad.dtype == torch.bfloat16
    assert model.ret_embedding.grad.abs().sum() > 0 and model.logit_scale.grad.abs().sum() > 0


def test_an_lm_whose_attention_packing_cannot_reproduce_runs_padded_passes(caplog):
    tokenizer = make_tokenizer()
    config = AutoConfig.for_model(
        "gemma3_text", vocab_size=len(tokenizer), use_bidirectional_attention=True, **LLAMA_SHAPE
    )
    with caplog.at_level("WARNING", logger="fromage.model.fromage"):
        model = FromageModel(AutoModelForCausalLM.from_config(config), tokenizer, tiny_clip_tower())
    assert not model.pack_sequences
    assert [r.getMessage() for r in caplog.records] == [
        "pack_sequences is off for this LM: its attention is bidirectional, "
        "so sequences packed in one row would see later ones"
    ]
