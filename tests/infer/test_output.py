"""Output processing against whole decodes: the incremental detokeniser, stop strings across tokens, held-back
text, and `<think>` splitting of streamed pieces."""

import random

from qiusuo.infer.output import Detokenizer, TextOutput, ThinkSplitter

# words the fixture tokenizer has merges for, and characters it never saw (split into UTF-8 byte tokens)
TEXT = "Hello world, héllo wörld, 你好 日本語 👋 naïve straße <think>x</think> done"


class CountingTokenizer:
    """The fixture tokenizer, recording how many ids each decode call is given."""

    def __init__(self, tok):
        self.tok, self.sizes = tok, []

    def decode(self, ids):
        self.sizes.append(len(ids))
        return self.tok.decode(ids)


def test_detokenizer_equals_whole_decode_at_every_length(tok):
    """After every token, the incremental text is exactly `decode(all ids so far)`: on multi-byte text split
    into byte tokens, and on random ids (broken UTF-8, special tokens). On well-formed text each decode sees
    only a few tokens, never the whole output."""
    ids = tok.encode(TEXT)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some characters really are split over tokens
    rng = random.Random(0)
    noise = [rng.randrange(tok.vocab_size) for _ in range(300)]
    for stream in (ids, noise):
        counting = CountingTokenizer(tok)
        d = Detokenizer(counting)
        for k, t in enumerate(stream, 1):
            d.add(t)
            assert d.text == tok.decode(stream[:k])
        if stream is ids:
            assert max(counting.sizes) <= 6 < len(ids)


def test_stop_strings_split_across_tokens(tok):
    """A stop string that no single token holds is found at the token that completes it; nothing of it is
    released before; the text ends right before it. Multi-byte stop strings included."""
    ids = tok.encode(TEXT)
    for stop in ["lo wö", "本語", "👋 na"]:
        assert all(stop not in tok.decode([t]) for t in ids)
        cut = TEXT.find(stop)
        done_at = next(k for k in range(1, len(ids) + 1) if stop in tok.decode(ids[:k]))
        out, released = TextOutput(tok, [stop]), ""
        for k, t in enumerate(ids, 1):
            piece, reason = out.push(t, final=False)
            released += piece
            assert TEXT[:cut].startswith(released)
            if reason is not None:
                break
        assert (k, reason, released) == (done_at, "stop", TEXT[:cut])


def test_released_text_holds_back_broken_characters(tok):
    """Without stop strings, pieces never end in a broken character, and pieces + what is held back at the end
    are the whole decode (as when a stop token ends the sequence)."""
    ids = tok.encode(TEXT)
    out, pieces = TextOutput(tok, []), []
    for t in ids[:-1]:
        piece, reason = out.push(t, final=False)
        assert reason is None and "\ufffd" not in piece
        pieces.append(piece)
    assert "".join(pieces) + out.rest() == tok.decode(ids[:-1])
    piece, reason = out.push(ids[-1], final=True)
    assert reason == "length" and "".join(pieces) + piece == TEXT and out.rest() == ""


def test_think_splitter_streamed_equals_whole():
    text = "<think>step one, step two</think>\n\nThe answer is 4."
    whole = ThinkSplitter().feed(text, final=True)
    assert whole == ("step one, step two", "The answer is 4.")
    for k in (1, 2, 3, 5):
        sp, r, c = ThinkSplitter(), [], []
        pieces = [text[i:i + k] for i in range(0, len(text), k)]
        for i, p in enumerate(pieces):
            a, b = sp.feed(p, final=i == len(pieces) - 1)
            r.append(a)
            c.append(b)
        assert ("".join(r), "".join(c)) == whole
    assert ThinkSplitter(thinking=True).feed("hmm</think>ok", final=True) == ("hmm", "ok")
