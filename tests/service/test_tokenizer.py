"""Incremental detokenization: UTF-8-safe, stop sequences held back and never emitted."""

from __future__ import annotations

import pytest

from service.tokenizer import IncrementalDetokenizer, TemplateError, TextTokenizer


@pytest.fixture(scope="module")
def tok(default_bundle):
    return TextTokenizer(default_bundle / "tokenizer.json", None, None, None)


def stream(tok, text, stop=()):
    detok = IncrementalDetokenizer(tok, list(stop))
    pieces, stopped = [], False
    for t in tok.encode(text):
        d = detok.add(t)
        assert "\ufffd" not in d.text
        pieces.append(d.text)
        if d.stopped:
            stopped = True
            break
    if not stopped:
        pieces.append(detok.flush())
    return pieces, stopped


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀👍🏽 done", "mixed 中文 and 😀 ok"])
def test_split_characters_are_held_until_complete(tok, text):
    ids = tok.encode(text)
    assert len(ids) > 2
    pieces, _ = stream(tok, text)
    assert "".join(pieces) == text


def test_stop_sequence_spanning_tokens_is_never_emitted(tok):
    text = "The answer is 42. END OF STORY and more"
    pieces, stopped = stream(tok, text, stop=["END OF"])
    assert stopped and "".join(pieces) == "The answer is 42. "
    assert not any("END" in p for p in pieces)


def test_text_that_only_looks_like_a_stop_is_released(tok):
    pieces, stopped = stream(tok, "an ENDless road", stop=["END OF"])
    assert not stopped and "".join(pieces) == "an ENDless road"


def test_earliest_of_several_stops_wins(tok):
    pieces, stopped = stream(tok, "alpha beta gamma delta", stop=["delta", "beta"])
    assert stopped and "".join(pieces) == "alpha "


def test_chat_template_renders_generation_prompt(default_bundle):
    import json

    m = json.loads((default_bundle / "manifest.json").read_text())
    t = TextTokenizer(default_bundle / "tokenizer.json", m["tokenizer"]["chat_template"], None, None)
    text = t.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi<|im_end|>" in text


def test_chat_template_environment_matches_transformers(default_bundle):
    template = (
        "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
        "{{ m['content'] | tojson }}{% if loop.index == 2 %}{% break %}{% endif %}{% endfor %}"
        "|{{ strftime_now('%Y') }}"
        "{% if messages | length > 3 %}{{ raise_exception('too many') }}{% endif %}"
    )
    tok = TextTokenizer(default_bundle / "tokenizer.json", template, None, None)
    msgs = [{"role": "user", "content": "<b>&'é"}, {"role": "skip", "content": "x"}, {"role": "user", "content": "y"}]
    out = tok.apply_chat_template(msgs)
    import datetime

    assert out == f'"<b>&\'é""y"|{datetime.datetime.now().year}'  # no HTML escaping, non-ASCII kept
    with pytest.raises(TemplateError, match="too many"):
        tok.apply_chat_template(msgs + [{"role": "user", "content": "z"}])


def test_a_prompt_ending_inside_a_character_sends_only_the_character_it_completes(tok):
    """Token-id prompts can end inside a character: the prompt's own text never leaks into the completion, and a
    stop string found only in the prompt does not end it."""
    emoji = tok.encode(" 😀 ok")  # " " + the emoji's first bytes, its last bytes, " ok"
    prompt = tok.encode("The quick hi") + emoji[:1]
    assert tok.decode(prompt).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, ["hi"], prompt[-4:])
    pieces = [detok.add(t) for t in emoji[1:]]
    assert not any(p.stopped for p in pieces)
    assert "".join(p.text for p in pieces) + detok.flush() == "😀 ok"


def test_logprob_tokens_of_part_of_a_character_carry_their_own_bytes(tok):
    emoji = tok.encode("😀")
    assert len(emoji) > 1  # a character over several tokens
    raw = b"".join(tok.token_bytes(t) for t in emoji)
    assert raw == "😀".encode()
    texts = [tok.token_text(t) for t in emoji]
    assert all(t.startswith("bytes:") and "\ufffd" not in t for t in texts)
    assert len(set(texts)) == len(texts)  # two such tokens stay apart (completions' top_logprobs keys)
    assert tok.token_text(tok.encode(" ok")[0]) == " ok"
    assert tok.token_bytes(2) == b"<|im_end|>" and not tok.shows(2) and tok.shows(emoji[0])


def test_a_prompt_ending_in_a_real_replacement_character_keeps_it(tok):
    """U+FFFD typed in the prompt is a whole character, not pending bytes: the completion does not repeat it."""
    prompt = tok.encode("caf\ufffd")
    detok = IncrementalDetokenizer(tok, [], prompt[-4:])
    text = "".join(detok.add(t).text for t in tok.encode(" world")) + detok.flush()
    assert text == " world"
    assert tok.prompt_text(prompt) == "caf\ufffd"


def test_an_echoed_prompt_leaves_its_unfinished_character_to_the_completion(tok):
    emoji = tok.encode(" 😀")  # " " + the emoji's first bytes, then its last byte
    prompt = tok.encode("hi") + emoji[:1]
    assert tok.unfinished(prompt) == (len(prompt) - 1, " ")
    assert tok.prompt_text(prompt) == "hi "  # the completion's first token finishes "😀"
    assert tok.prompt_text(tok.encode("hi 😀")) == "hi 😀"


def test_a_sentencepiece_words_bytes_keep_its_leading_space(tmp_path):
    """Llama 2 / Mistral decoders strip the first space of a decode: a word's token alone still has its own."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "a": 1, "▁world": 2, "<0xF0>": 3, "<0x9F>": 4, "<0x98>": 5, "<0x80>": 6}
    t = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    t.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    t.save(str(tmp_path / "tokenizer.json"))
    sp = TextTokenizer(tmp_path / "tokenizer.json", None, None, None)
    assert sp.decode([2]) == "world" and sp.token_bytes(2) == b" world" and sp.token_text(2) == " world"
    assert b"".join(sp.token_bytes(i) for i in (3, 4, 5, 6)) == "😀".encode()
    assert sp.token_text(3) == "bytes:\\xf0"
