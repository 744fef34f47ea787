"""Token pieces become final text: split UTF-8 characters and split stop sequences."""

from __future__ import annotations

from runtime.gguf.text_stream import TextStream


def feed(stream: TextStream, pieces: list[bytes]) -> list[str]:
    return [stream.push(p) for p in pieces]


def test_a_character_split_across_tokens_is_sent_whole():
    stream = TextStream([])
    euro = "€".encode()
    assert feed(stream, [b"1", euro[:1], euro[1:2], euro[2:], b"!"]) == ["1", "", "", "€", "!"]


def test_text_that_may_start_a_stop_sequence_is_held_back_then_released():
    stream = TextStream(["END"])
    assert feed(stream, [b"the E", b"N", b"d"]) == ["the ", "", "ENd"]
    assert not stream.stopped and stream.flush() == ""


def test_a_stop_sequence_split_across_tokens_ends_the_text_before_it():
    stream = TextStream(["\n\n", "END"])
    assert feed(stream, [b"one", b" E", b"ND two"]) == ["one", " ", ""]
    assert stream.stopped
    assert stream.push(b"more") == "" and stream.flush() == ""


def test_the_earliest_of_several_stop_sequences_wins():
    stream = TextStream(["b", "a"])
    assert stream.push(b"xxab") == "xx" and stream.stopped


def test_held_text_is_flushed_when_generation_ends_otherwise():
    stream = TextStream(["STOP"])
    assert stream.push(b"go ST") == "go "
    assert stream.flush() == "ST"
