import pytest

from fromage.model.tokens import add_ret_token, special_prefix_ids, tokenize_captions
from tiny import CAPTIONS, make_tokenizer


@pytest.mark.parametrize("bos", [True, False])
def test_ret_token_added_once_as_last_id(bos):
    tokenizer = make_tokenizer(bos=bos)
    n = len(tokenizer)
    ret_id = add_ret_token(tokenizer)
    assert ret_id == n == add_ret_token(tokenizer)
    assert len(tokenizer) == n + 1
    assert tokenizer("a dog[RET]", add_special_tokens=False).input_ids[-1] == ret_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id


def test_ret_token_that_is_not_last_is_refused():
    tokenizer = make_tokenizer()
    add_ret_token(tokenizer)
    tokenizer.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="must be the last token"):
        add_ret_token(tokenizer)


@pytest.mark.parametrize("bos, prefix", [(True, [0]), (False, [])])
def test_special_prefix(bos, prefix):
    assert special_prefix_ids(make_tokenizer(bos=bos)) == prefix


def test_captions_end_in_exactly_one_ret_even_when_truncated():
    tokenizer = make_tokenizer()
    ret_id = add_ret_token(tokenizer)
    long = " and ".join(CAPTIONS[:6])
    captions = [CAPTIONS[0], long, "", "text with [RET] inside"]
    ids, mask = tokenize_captions(tokenizer, captions, ret_id, max_len=12)

    lengths = mask.sum(1)
    assert ids.shape[1] == int(lengths.max()) == 12  # padded to the longest, capped
    assert lengths[2] == 2  # BOS + [RET] for the empty caption
    for row, n in zip(ids, lengths.tolist(), strict=True):
        assert row[n - 1] == ret_id
        assert (row[:n] == ret_id).sum() == 1
    # the truncated caption keeps its first max_len - 1 tokens
    full = tokenizer(long).input_ids
    assert ids[1, :11].tolist() == full[:11]


def test_padding_is_only_as_long_as_the_longest_caption():
    tokenizer = make_tokenizer()
    ret_id = add_ret_token(tokenizer)
    ids, mask = tokenize_captions(tokenizer, ["a red star", "a cross"], ret_id, max_len=24)
    assert ids.shape[1] == len(tokenizer("a red star[RET]").input_ids)
    assert mask.sum(1).tolist() == [
        len(tokenizer(c + "[RET]").input_ids) for c in ["a red star", "a cross"]
    ]
