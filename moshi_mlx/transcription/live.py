"""Transcription as the audio comes: the text printed event by event, and the microphone
loop (capture -> Mimi -> LM; Ctrl-C or a duration ends it, then the flush)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from moshi_mlx.audio.rates import SAMPLE_RATE
from moshi_mlx.transcription.transcriber import (
    EndOfTurn,
    Event,
    TextPiece,
    Transcriber,
    Transcript,
    transcript_from_events,
)


def print_events(events: list[Event], stream: TextIO, mark_turns: bool = True) -> None:
    """The text pieces of `events` (and, with mark_turns, ` [end of turn]` lines) on stream."""
    out = []
    for event in events:
        if isinstance(event, TextPiece):
            out.append(event.text)
        elif mark_turns and isinstance(event, EndOfTurn):
            out.append(" [end of turn]\n")
    if out:
        stream.write("".join(out))
        stream.flush()


def transcribe_mic(transcriber: Transcriber, device: str | int | None, duration: float | None,
                   text_stream: TextIO, opener=None) -> Transcript:
    """Live: capture -> Mimi -> LM as the audio comes, the text printed on text_stream; Ctrl-C
    (or `duration` seconds of audio) stops, then the flush pushes the silence at once so the
    last words come out without waiting for them to be spoken."""
    from moshi_mlx.audio.capture import MicCapture

    capture = MicCapture(device, **({} if opener is None else {"opener": opener}))
    transcriber.reset(1)
    events: list[Event] = []
    fed = 0
    worst_backlog = 0.0
    limit = None if duration is None else int(duration * SAMPLE_RATE)
    capture.start()
    print(f"listening on {capture.name} (Ctrl-C to stop)", file=sys.stderr)
    started = time.perf_counter()
    try:
        while limit is None or fed < limit:
            pcm = capture.read(timeout=0.5)
            if limit is not None:
                pcm = pcm[: max(0, limit - fed)]
            if pcm.size:
                fed += pcm.size
                new = transcriber.feed(pcm)
                events += new
                print_events(new, text_stream)
                worst_backlog = max(worst_backlog, capture.backlog_seconds)
    except KeyboardInterrupt:
        pass
    finally:
        capture.close()
    new = transcriber.flush()
    events += new
    print_events(new, text_stream)
    text_stream.write("\n")
    spent = time.perf_counter() - started
    print(f"{fed / SAMPLE_RATE:.1f} s of audio; worst backlog {worst_backlog:.2f} s, dropped "
          f"{capture.dropped_seconds:.2f} s; compute {spent:.1f} s", file=sys.stderr)
    return transcript_from_events(events, transcriber.stream_text(0), fed / SAMPLE_RATE,
                                  transcriber.text_time)
