"""A conversation as the model reads it: turns, seen images, and fitting the context."""

import pytest

from fromage.infer.bank import RetrievedImage
from fromage.infer.dialogue import ANSWER_EXAMPLE, Dialogue, default_layout
from fromage.infer.generation import Generation
from tiny import random_pixels, tiny_fromage


def positions(model, dialogue) -> int:
    return model.embed_interleaved([dialogue.prompt()]).embeds.shape[1]


def test_qa_turns_and_replies_build_the_prompt_and_remember_shown_images():
    dialogue = Dialogue("qa")
    image = random_pixels(1)[0]
    dialogue.ask([image, "what is it?"], input_ids={"img0"})
    hit = RetrievedImage("img4", 0.5)
    dialogue.answer(Generation(pieces=["a red circle", [hit], " and more"]))
    dialogue.ask(["and now?"])
    assert dialogue.prompt()[0] == "Q: " and dialogue.prompt()[1] is image
    # one text piece between images, as training had one caption after an image
    assert dialogue.prompt()[2:] == ["what is it?\nA:a red circle and more\nQ: and now?\nA:"]
    assert dialogue.seen == {"img0", "img4"}


def test_plain_turns_are_read_as_training_read_pairs():
    dialogue = Dialogue("plain", caption_prompt="A picture of")
    image, other = random_pixels(2)
    dialogue.ask([image], input_ids={"img0"})  # an image alone: the training prompt follows
    assert dialogue.prompt() == [image, "A picture of"] and dialogue.asks_for_caption
    dialogue.answer(Generation(pieces=[" a red circle at the top left", [RetrievedImage("x", 1)]]))
    dialogue.ask(["there is a circle at the top left"])  # text: read without the image turn
    assert dialogue.prompt() == ["there is a circle at the top left"]
    assert not dialogue.asks_for_caption
    dialogue.answer(Generation(pieces=[[RetrievedImage("y", 1)], "ignored"]))
    dialogue.ask(["then it moves to the centre"])  # text after text: one story, replies unread
    assert dialogue.prompt() == ["there is a circle at the top left then it moves to the centre"]
    dialogue.ask([other, "A picture of"])  # the prompt typed: not added twice; read alone
    assert dialogue.prompt() == [other, "A picture of"]
    assert dialogue.seen == {"img0", "x", "y"}
    with pytest.raises(ValueError, match="layout must be one of"):
        Dialogue("chat")


def test_a_plain_question_about_an_image_is_read_as_its_caption_and_the_question():
    dialogue = Dialogue("plain", caption_prompt="A picture of")
    image, other = random_pixels(2)
    dialogue.ask([image, "A picture of"])  # the caption prompt typed: a caption, no question
    assert dialogue.question_images == []
    dialogue.ask(["earlier text"])
    dialogue.ask([image, "What colour is it?", other])
    assert dialogue.question_images == [image, other]
    with pytest.raises(ValueError, match="2 images asked about, 1 captions"):
        dialogue.read_captions(["a red circle"])
    dialogue.read_captions([" a red circle at the top left", "a blue star."])
    assert dialogue.question_images == []  # captioned once
    (prompt,) = dialogue.prompt()  # the text alone: not joined with the earlier text turn
    assert prompt == ANSWER_EXAMPLE.format(prompt="A picture of") + (
        "A picture of a red circle at the top left.\nA picture of a blue star.\n"
        "Q: What colour is it?\nA:"
    )
    dialogue.ask(["a red circle"])  # the next text message is a description again
    assert dialogue.prompt() == ["a red circle"] and not dialogue.answering


def test_the_default_layout_is_plain_for_small_lms():
    assert default_layout(tiny_fromage("opt")) == "plain"


def test_a_long_conversation_drops_old_turns_then_cuts_the_newest_message():
    model = tiny_fromage("opt")  # reads 128 positions
    dialogue = Dialogue("qa")
    for _ in range(3):
        dialogue.ask(["a red circle at the top left " * 3])
        dialogue.answer(Generation(pieces=["a blue star"]))
    assert positions(model, dialogue) > 128 - 16
    note = dialogue.fit(model, reserve=16)
    assert "dropped the oldest turns" in note and "128 positions" in note
    assert positions(model, dialogue) <= 128 - 16 and len(dialogue.turns) < 3

    dialogue = Dialogue("qa")
    dialogue.ask([random_pixels(1)[0], "a green square in the centre " * 40])
    note = dialogue.fit(model, reserve=16)
    assert note.startswith("cut the first") and "tokens of your message" in note
    assert positions(model, dialogue) <= 128 - 16
    assert dialogue.prompt()[-1].endswith("in the centre \nA:")  # the end of the message stays
    assert dialogue.fit(model, reserve=16) is None  # it fits now


def test_a_message_of_images_alone_too_long_is_refused():
    model = tiny_fromage("opt", n_visual_tokens=40)
    dialogue = Dialogue()
    dialogue.ask(list(random_pixels(4)))
    with pytest.raises(ValueError, match="send fewer images"):
        dialogue.fit(model, reserve=16)
