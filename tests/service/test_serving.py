"""SSE frames rendered from a template per choice equal the chunks rendered in full, whatever the text."""

from __future__ import annotations

import json

import pytest

from service.protocol import CompletionChoice, CompletionResponse
from service.serving import TEXT, TextFrames

HOSTILE = ["", "a", ' "quoted" \\ back\\slash', "line\nbreak\ttab\r", "\x00nul", TEXT, "é 日本 🙂", "</s>"]


def completion(model: str, usage: bool):
    def render(index: int, text: str) -> dict:
        body = CompletionResponse(
            id="cmpl-1", created=7, model=model, choices=[CompletionChoice(text=text, index=index)]
        )
        return {**body.model_dump(exclude={"usage"}), **({"usage": None} if usage else {})}

    return render


@pytest.mark.parametrize("model", ["tiny", f"odd{TEXT}name", 'quo"te'])
@pytest.mark.parametrize("usage", [False, True])
def test_frames_equal_full_rendering(model, usage):
    render = completion(model, usage)
    frames = TextFrames(render)
    for index in (0, 3):
        for text in HOSTILE:
            frame = frames(index, text)
            assert frame == f"data: {json.dumps(render(index, text), ensure_ascii=False)}\n\n"
            assert json.loads(frame[len("data: ") :])["choices"][0]["text"] == text
    assert set(frames.parts) == {0, 3}  # one template per choice
