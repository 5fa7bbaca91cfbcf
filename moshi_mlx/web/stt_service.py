"""Kyutai STT streams for the server: every client's audio goes through one `SttSlots` batch.

The event loop never touches the slots: each channel queues operations (audio, marker, end,
close), and one loop task hands the queued operations to the model thread together with the
next batched step, so the slots see them in order and only from that thread. Events come back
to each channel's queue.

A Marker is answered once its stream has run every frame sent before it plus the model's delay
(`SttSlots.flush_frames` steps), so all the words of that audio are out by then.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from moshi_mlx.audio.rates import FRAME_SIZE, SAMPLE_RATE
from moshi_mlx.errors import NoFreeSlot
from moshi_mlx.transcription.slots import SttSlots
from moshi_mlx.transcription.transcriber import (
    Event,
    Flushed,
    TextPiece,
    Transcript,
    transcript_from_events,
)

log = logging.getLogger("moshi_mlx.serve")


@dataclass(frozen=True)
class MarkerReached:
    """The marker `id` of `stream`: all audio sent before it is transcribed."""

    stream: int
    id: int


@dataclass(frozen=True)
class TextSoFar:
    """The decoded text of `stream` after a step that added to it (channels that ask)."""

    stream: int
    text: str


Delivery = tuple["SttChannel", Any]  # an event for a channel
Buffered = tuple["SttChannel", int]  # a channel's samples waiting for the model


@dataclass
class _Op:
    kind: str  # "open" | "audio" | "marker" | "end" | "close"
    channel: SttChannel
    payload: Any = None


class SttChannel:
    """One client's stream. Read `events` (an asyncio.Queue of transcription events and
    `MarkerReached`); `push`, `mark`, `end` and `close` never block."""

    def __init__(self, service: SttService) -> None:
        self._service = service
        self.slot: int | None = None  # known once the model thread opened it
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.buffered_samples = 0  # audio queued or buffered, not yet stepped (approximate)
        self.closed = False
        self.want_text = False  # also deliver TextSoFar after each step that adds text
        self._markers: list[tuple[int, int]] = []  # (step to reach, marker id), model thread
        self._drained = asyncio.Event()
        self._drained.set()

    def push(self, pcm: np.ndarray) -> None:
        pcm = np.asarray(pcm, dtype=np.float32).reshape(-1)
        if pcm.size:
            self.buffered_samples += pcm.size
            self._drained.clear()
            self._service._queue(_Op("audio", self, pcm))

    def mark(self, marker_id: int) -> None:
        self._service._queue(_Op("marker", self, marker_id))

    def end(self) -> None:
        """No more audio: the partial frame and the flush silence follow, then `Flushed`."""
        self._service._queue(_Op("end", self))

    def close(self) -> None:
        """Free the slot now (idempotent)."""
        if not self.closed:
            self.closed = True
            self._drained.set()
            self._service._queue(_Op("close", self))

    async def wait_buffer_below(self, samples: int) -> None:
        """Back-pressure: wait until at most `samples` samples wait for the model."""
        while self.buffered_samples > samples and not self.closed:
            self._drained.clear()
            await self._drained.wait()


class SttService:
    """Owns an `SttSlots` and the loop that steps it on the model thread."""

    def __init__(self, slots: SttSlots, executor: Executor) -> None:
        self.slots = slots
        self.executor = executor
        self._ops: list[_Op] = []
        self._wake = asyncio.Event()
        self._reserved = 0
        self._channels: dict[int, SttChannel] = {}  # slot -> channel (model-thread view)
        self._task: asyncio.Task | None = None
        self.last_step_ms = 0.0

    @property
    def capacity(self) -> int:
        return self.slots.capacity

    @property
    def open_channels(self) -> int:
        return self._reserved

    def has_room(self) -> bool:
        return self._reserved < self.capacity

    # ---------------------------------------------------------------- channels
    def open(self) -> SttChannel:
        """A new stream; raises NoFreeSlot when every slot is taken."""
        if self._reserved >= self.capacity:
            raise NoFreeSlot("no free channels")
        self._reserved += 1
        channel = SttChannel(self)
        self._queue(_Op("open", channel))
        return channel

    def reopen(self, channel: SttChannel) -> SttChannel:
        """Start `channel`'s client again on a fresh stream (Kyutai's `Init`), keeping its
        place: the old stream is closed and a new one opened in the same breath."""
        channel.close()
        self._reserved += 1  # the close above gives its place back once applied
        fresh = SttChannel(self)
        self._queue(_Op("open", fresh))
        return fresh

    def _queue(self, op: _Op) -> None:
        self._ops.append(op)
        self._wake.set()

    # ---------------------------------------------------------------- loop
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            more = True
            while more or self._ops:
                ops, self._ops = self._ops, []
                try:
                    delivered, buffered, more = await loop.run_in_executor(
                        self.executor, self._apply_and_step, ops)
                except Exception:
                    log.exception("the STT step failed; closing its streams")
                    self._fail_all(ops)
                    more = False
                    continue
                for channel, event in delivered:
                    channel.events.put_nowait(event)
                for op in ops:
                    if op.kind == "close":
                        self._reserved -= 1
                for channel, samples in buffered:
                    channel.buffered_samples = samples
                    if samples <= FRAME_SIZE:
                        channel._drained.set()

    def _fail_all(self, ops: list[_Op]) -> None:
        for channel in {op.channel for op in ops} | set(self._channels.values()):
            channel.events.put_nowait(RuntimeError("the model failed"))

    # ---------------------------------------------------------------- model thread
    def _apply_and_step(self, ops: list[_Op]) -> tuple[list[Delivery], list[Buffered], bool]:
        """Apply the queued operations in order, then run one batched step if any stream
        has a whole frame. Returns the (channel, event) pairs, each open channel's buffered
        samples, and whether more work waits."""
        delivered: list[tuple[SttChannel, Any]] = []
        slots = self.slots
        for op in ops:
            channel = op.channel
            if op.kind == "open":
                channel.slot = slots.open()
                self._channels[channel.slot] = channel
                continue
            if channel.slot is None or self._channels.get(channel.slot) is not channel:
                continue  # closed already
            if op.kind == "audio":
                slots.push(channel.slot, op.payload)
            elif op.kind == "marker":
                waiting = math.ceil(slots.buffered_samples(channel.slot) / FRAME_SIZE)
                target = slots.steps_of(channel.slot) + waiting + slots.flush_frames
                channel._markers.append((target, int(op.payload)))
            elif op.kind == "end":
                slots.end(channel.slot)
            elif op.kind == "close":
                slots.close(channel.slot)
                del self._channels[channel.slot]
        if not slots.has_work():
            return delivered, self._buffered(), False
        started = time.perf_counter()
        events = slots.step()
        self.last_step_ms = 1000.0 * (time.perf_counter() - started)
        grown: set[int] = set()
        for event in events:
            channel = self._channels.get(event.stream)
            if channel is not None:
                delivered.append((channel, event))
                if isinstance(event, TextPiece) and channel.want_text:
                    grown.add(event.stream)
        for slot in sorted(grown):
            delivered.append((self._channels[slot], TextSoFar(slot, slots.text(slot))))
        for channel in self._channels.values():
            if channel._markers:
                reached = slots.steps_of(channel.slot)
                for _, marker_id in [m for m in channel._markers if m[0] <= reached]:
                    delivered.append((channel, MarkerReached(channel.slot, marker_id)))
                channel._markers = [m for m in channel._markers if m[0] > reached]
        return delivered, self._buffered(), slots.has_work()

    def _buffered(self) -> list[tuple[SttChannel, int]]:
        return [(channel, self.slots.buffered_samples(slot))
                for slot, channel in self._channels.items()]

    # ---------------------------------------------------------------- whole clips
    async def transcribe(self, pcm: np.ndarray,
                         on_text: Callable[[str], Awaitable[None]] | None = None) -> Transcript:
        """A whole clip through a slot of the batch (float32 mono 24 kHz); on_text(delta) as
        the text comes (the deltas add up to the transcript's text). Raises NoFreeSlot when
        every slot is taken."""
        channel = self.open()
        channel.want_text = on_text is not None
        sent = ""
        try:
            channel.push(pcm)
            channel.end()
            events: list[Event] = []
            while True:
                event = await channel.events.get()
                if isinstance(event, Exception):
                    raise event
                if isinstance(event, MarkerReached):
                    continue
                if isinstance(event, TextSoFar):
                    text = event.text.strip()
                    if on_text is not None and text.startswith(sent) and text != sent:
                        delta, sent = text[len(sent):], text
                        await on_text(delta)
                    continue
                events.append(event)
                if isinstance(event, Flushed):
                    break
            text = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.slots.text, channel.slot)
            if on_text is not None and text.startswith(sent) and text != sent:
                await on_text(text[len(sent):])
            return transcript_from_events(events, text, len(pcm) / SAMPLE_RATE,
                                          self.slots.timing.text_time)
        finally:
            channel.close()
