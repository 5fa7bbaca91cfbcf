"""Streaming generation with the Moshi LM: one `LmGen.step` per 80 ms frame.

Timing follows the official PyTorch `LMGen`: at step t, stream s (delay d_s) reads its initial
token while t <= d_s; otherwise the user's codebooks read the user frame t - d_s and Moshi's own
text/audio streams read the tokens sampled at step t - 1. Step t returns the text token sampled
at step t and, from step max_delay on, Moshi's audio frame whose codebook k was sampled at step
t - max_delay + d_k (with the released delays: semantic code of step t - 1, acoustic codes of
step t).

A model whose depformer predicts both audio streams (dep_q = n_q: NVIDIA's PersonaPlex) still
reads the user's codes as its input; its frame holds Moshi's codebooks, then the model's
prediction of the user frame given at step t - D (D: the user stream's largest delay). The
predictions never feed back. As in PersonaPlex's own generator, each user slice reads the
given code of the codebook before it (teacher forcing), and the first user codebook's code at
step t is that of the frame given at step t + 1, so the user slices of step t run at step t + 1.
"""

from __future__ import annotations

import time
import weakref
from typing import Any

import mlx.core as mx
import numpy as np

from moshi_mlx.models.lm import Lm
from moshi_mlx.models.lm_state import LmStreamState
from moshi_mlx.modules.sampling import Sampler, SamplingSettings


def _with_forced(sampled: mx.array, forced: mx.array | None) -> mx.array:
    """The forced tokens where they are >= 0, the sampled ones elsewhere."""
    if forced is None:
        return sampled
    forced = mx.array(forced).astype(mx.int32)
    return mx.where(forced >= 0, forced, sampled)


class LmGen:
    """Streaming Moshi generator: user audio codes in, Moshi's text token and audio codes out.

    compile=True runs sampling + depformer (and the fixed-shape parts of the temporal step)
    through `mx.compile`, traced on the first step: create the generator after loading weights.
    The conversation's streaming state is `state` (an `LmStreamState`, new at every `reset`).
    """

    def __init__(self, lm: Lm, text_temp: float = 0.7, text_topk: int = 25,
                 audio_temp: float = 0.8, audio_topk: int = 250, seed: int | None = None,
                 compile: bool = True) -> None:
        self.lm = lm
        cfg = lm.cfg
        self.cfg = cfg
        self.text_sampler = Sampler(text_temp, text_topk)
        self.audio_sampler = Sampler(audio_temp, audio_topk)
        self.seed = seed
        self.num_user = cfg.user_audio_q
        self.num_own = cfg.own_audio_q
        self.predicts_user = cfg.predicts_user
        self.max_delay = cfg.max_delay
        delays = np.array(cfg.delays)
        self._delays = delays
        self._user_delays = delays[1 + self.num_own:]
        self._own_audio_delays = delays[1: 1 + self.num_own]
        self._initial = np.array(
            [cfg.text_initial_token] + [cfg.audio_initial_token] * cfg.n_q, dtype=np.int32
        )
        self._initial_batch: mx.array | None = None  # the initial tokens of the last batch size
        # Column masks, built once: user codebooks by delay, own codebooks by output lag.
        self._user_delay_masks = {
            int(d): mx.array(self._user_delays == d) for d in np.unique(self._user_delays) if d
        }
        lag = self.max_delay - self._own_audio_delays
        self._output_lag_masks = {int(n): mx.array(lag == n) for n in np.unique(lag) if n}
        self._greedy = self.text_sampler.greedy and self.audio_sampler.greedy
        # Sampling + the 8 depformer steps have fixed shapes: one compiled graph per batch size.
        self.compile = compile
        self._initial_samplers = (self.text_sampler, self.audio_sampler)
        self._compiled: dict[tuple[Sampler, Sampler], Any] = {}
        self._compiled_sample_all = self._compiled_for(self._initial_samplers)
        self.reset()

    def _compiled_for(self, samplers: tuple[Sampler, Sampler]) -> Any:
        """The compiled sampling graph of these samplers (their settings are constants in the
        trace). Kept: the graph of the construction-time samplers and the newest one."""
        if not self.compile:
            return None
        if samplers not in self._compiled:
            self._compiled = {k: v for k, v in self._compiled.items()
                              if k == self._initial_samplers}
            # Through a weak reference: a compiled function holding `self` would make a cycle
            # that keeps a dropped generator (and its model's GBs) alive until a garbage
            # collection.
            generator = weakref.ref(self)
            self._compiled[samplers] = mx.compile(
                lambda *args: generator()._sample_traced(*args))
        return self._compiled[samplers]

    @property
    def sampling(self) -> SamplingSettings:
        return SamplingSettings(self.text_sampler.temp, self.text_sampler.top_k,
                                self.audio_sampler.temp, self.audio_sampler.top_k)

    def set_sampling(self, settings: SamplingSettings) -> bool:
        """Sample with `settings` from the next step on; True when they changed (the next step
        then traces a new compiled graph, unless they are the construction-time ones)."""
        samplers = (Sampler(settings.text_temp, settings.text_topk),
                    Sampler(settings.audio_temp, settings.audio_topk))
        if samplers == (self.text_sampler, self.audio_sampler):
            return False
        self.text_sampler, self.audio_sampler = samplers
        self._greedy = self.text_sampler.greedy and self.audio_sampler.greedy
        self._compiled_sample_all = self._compiled_for(samplers)
        return True

    def reset(self, state: LmStreamState | None = None) -> None:
        """Start a new conversation (same seed -> same samples again), or continue from
        `state` (taken as it is: pass a copy to keep the original, e.g. a prompt's state)."""
        self._state = LmStreamState.start(self.lm, self.seed) if state is None else state
        self.timings: dict[str, float] | None = None  # set to {} to time the two halves

    @property
    def state(self) -> LmStreamState:
        """The conversation's streaming state (read it; `step` and `reset` change it)."""
        return self._state

    def set_last_tokens(self, text, audio) -> None:
        """Replace the last step's own tokens: the next step reads `text` [B] and Moshi's
        `audio` [B, num_own] (in the delayed layout, as that step forced or sampled them), and
        the frames that hold those codebooks return them. After replaying a PersonaPlex
        voice's saved embeddings, its token cache holds them (`loading.torch_pickle`)."""
        state = self._state
        if state.steps == 0:
            raise ValueError("set_last_tokens needs a step before it")
        state.text = mx.array(text).astype(mx.int32)
        state.audio_tokens = [*state.audio_tokens[:-1], mx.array(audio).astype(mx.int32)]

    # ------------------------------------------------------------------ inputs
    def _input_tokens(self, state: LmStreamState, batch: int) -> mx.array:
        """The 1 + n_q tokens [B, 1 + n_q] read by step `state.steps`."""
        t = state.steps
        if t == 0:
            return self._initial_tokens(batch)
        history = state.user_codes
        user = history[-1]  # delay 0: frame t
        for d, columns in self._user_delay_masks.items():
            if d <= t:  # (frames before 0 are replaced by initial tokens below)
                user = mx.where(columns, history[-1 - d], user)
        tokens = mx.concatenate([state.text[:, None], state.audio_tokens[-1], user], axis=1)
        if t <= self.max_delay:  # streams with delay >= t still read their initial token
            tokens = mx.where(mx.array(t <= self._delays), self._initial_tokens(batch), tokens)
        return tokens

    def _output_frame(self, state: LmStreamState) -> mx.array:
        """Moshi's audio frame completed at this step [B, dep_q] (codebook k from step
        state.steps - max_delay + d_k)."""
        sampled = state.audio_tokens
        frame = sampled[-1]
        for steps_back, columns in self._output_lag_masks.items():
            frame = mx.where(columns, sampled[-1 - steps_back], frame)
        return frame

    def _initial_tokens(self, batch: int) -> mx.array:
        if self._initial_batch is None or self._initial_batch.shape[0] != batch:
            rows = np.broadcast_to(self._initial, (batch, self._initial.size))
            self._initial_batch = mx.array(rows)
        return self._initial_batch

    # ------------------------------------------------------------------ step
    def _sample_traced(self, *args: mx.array) -> tuple:
        """What the compiled sampling graph traces (`_sample_own_eager` for dep_q 16)."""
        if self.predicts_user:
            return self._sample_own_eager(*args)
        return self._sample_all_eager(*args)

    def _sample_all_eager(self, hidden: mx.array, text_logits: mx.array, key: mx.array
                          ) -> tuple[mx.array, mx.array, list[mx.array], mx.array]:
        """Text token, the depformer's audio tokens [B, dep_q] and logits, the next PRNG key."""
        keys = mx.random.split(key, 2 + self.cfg.dep_q)
        text = self.text_sampler(text_logits, keys[1])
        audio, audio_logits = self.lm.depformer(
            hidden, text, lambda logits, k: self.audio_sampler(logits, keys[2 + k])
        )
        return text, audio, audio_logits, keys[0]

    def step(self, user_codes, *, force_text: mx.array | None = None,
             force_audio: mx.array | None = None, embedded: mx.array | None = None
             ) -> tuple[mx.array, mx.array | None]:
        """One 80 ms frame. user_codes [B, num_user] ints: the user's newest Mimi codes.

        Returns (text_token [B], audio_codes [B, dep_q] or None before max_delay steps).
        force_text [B] / force_audio [B, num_own] (teacher forcing, for evaluation and
        prompts): use these tokens instead of the sampled ones (a negative entry forces
        nothing: that token is sampled); the logits are still those of
        the model (`state.text_logits`, `state.audio_logits`). embedded [B, dim]: the
        temporal transformer reads this summed input embedding instead of embedding this
        step's tokens (replaying a PersonaPlex voice prompt's saved embeddings; the tokens of
        the step, forced or given, still become the history later steps read).
        """
        start_time = time.perf_counter() if self.timings is not None else 0.0
        state = self._state
        user = mx.array(user_codes).astype(mx.int32)
        if user.ndim != 2 or user.shape[1] != self.num_user:
            raise ValueError(f"user_codes must be [B, {self.num_user}], got {user.shape}")
        batch = user.shape[0]
        state.user_codes = [*state.user_codes[-self.max_delay:], user] if self.max_delay \
            else [user]

        tokens = None if embedded is not None else self._input_tokens(state, batch)
        hidden, text_logits = self.lm.temporal(tokens, state.caches, compiled=self.compile,
                                               embedded=embedded)
        if self.timings is not None:  # profiling only: an extra sync between the halves
            mx.eval(hidden, text_logits)
            half_time = time.perf_counter()
            self.timings["temporal_s"] = half_time - start_time

        if self.predicts_user:
            text, raw_audio, audio_logits = self._step_own(state, hidden, text_logits,
                                                           force_text, force_audio)
        elif force_text is None and force_audio is None:
            sample_all = self._compiled_sample_all or self._sample_all_eager
            text, raw_audio, audio_logits, next_key = sample_all(hidden, text_logits, state.key)
            if not self._greedy:
                state.key = next_key
        else:  # teacher forcing: eager, the forced tokens replace the sampled ones
            keys = mx.random.split(state.key, 2 + self.cfg.dep_q)
            state.key = keys[0]
            text = _with_forced(self.text_sampler(text_logits, keys[1]), force_text)

            def sample_audio(logits: mx.array, k: int) -> mx.array:
                forced = None if force_audio is None else mx.array(force_audio)[:, k]
                return _with_forced(self.audio_sampler(logits, keys[2 + k]), forced)

            raw_audio, audio_logits = self.lm.depformer(hidden, text, sample_audio)

        state.text = text
        state.audio_tokens = [*state.audio_tokens[-self.max_delay:], raw_audio] \
            if self.max_delay else [raw_audio]
        frame = self._output_frame(state) if state.steps >= self.max_delay else None
        if frame is not None and self.predicts_user:
            frame = mx.concatenate([frame, self._predicted_user_frame(state, batch)], axis=1)
        state.text_logits, state.audio_logits = text_logits, audio_logits

        outputs = [text, raw_audio, state.key] + ([] if frame is None else [frame])
        if self.predicts_user:
            outputs += state.user_predicted[-1:] + list(state.user_slices_pending[2])
        for cache in state.caches:
            outputs += [cache.keys, cache.values]
        mx.eval(outputs)  # the one host sync of a step
        if self.timings is not None:
            self.timings["depformer_s"] = time.perf_counter() - half_time
        state.steps += 1
        return text, frame

    # ------------------------------------------------------------------ dep_q 16
    def _own_feed(self, t: int):
        """At step t, the tokens the depformer's next slice reads where a codebook is still
        at its initial token (t + 1 <= its delay), as PersonaPlex's generator feeds them; None
        when no codebook is (every step from max_delay on)."""
        late = [k for k, d in enumerate(self._own_audio_delays) if t + 1 <= d]
        if not late:
            return None
        initial = self.cfg.audio_initial_token

        def feed(k: int, token: mx.array) -> mx.array:
            return mx.full(token.shape, initial, dtype=token.dtype) if k in late else token

        return feed

    def _sample_own_eager(self, hidden: mx.array, text_logits: mx.array, key: mx.array,
                          feed=None, force_text: mx.array | None = None,
                          force_audio: mx.array | None = None) -> tuple:
        """dep_q 16: text and Moshi's slices -> (text, audio [B, num_own], logits, next key,
        this step's keys, the token the first user slice reads, the depformer cache arrays)."""
        keys = mx.random.split(key, 2 + self.cfg.dep_q)
        text = _with_forced(self.text_sampler(text_logits, keys[1]), force_text)

        def sample(logits: mx.array, k: int) -> mx.array:
            forced = None if force_audio is None else mx.array(force_audio)[:, k]
            return _with_forced(self.audio_sampler(logits, keys[2 + k]), forced)

        depformer = self.lm.depformer
        caches = depformer.new_caches()
        tokens, logits = depformer.run(hidden, text, sample, caches, range(self.num_own), feed)
        last = tokens[-1] if feed is None else feed(self.num_own - 1, tokens[-1])
        arrays = [a for cache in caches for a in (cache.keys, cache.values)]
        return text, mx.stack(tokens, axis=1), logits, keys[0], keys, last, arrays

    def _step_own(self, state: LmStreamState, hidden: mx.array, text_logits: mx.array,
                  force_text: mx.array | None, force_audio: mx.array | None
                  ) -> tuple[mx.array, mx.array, list[mx.array]]:
        """dep_q 16: the user slices left by the last step (they read this step's user
        frame), then this step's text and Moshi's slices; the user slices of this step wait."""
        if state.user_slices_pending is not None:
            predicted = self._user_slices(state)
            state.user_predicted = [*state.user_predicted[-self.max_delay:], predicted] \
                if self.max_delay else [predicted]
        feed = self._own_feed(state.steps)
        plain = feed is None and force_text is None and force_audio is None
        if plain and self._compiled_sample_all is not None:
            out = self._compiled_sample_all(hidden, text_logits, state.key)
        else:
            out = self._sample_own_eager(hidden, text_logits, state.key, feed, force_text,
                                         force_audio)
        text, audio, logits, next_key, keys, last, arrays = out
        if not (plain and self._greedy):
            state.key = next_key
        state.user_slices_pending = (hidden, last, arrays, keys)
        return text, audio, logits

    def _user_slices(self, state: LmStreamState) -> mx.array:
        """The user slices of the last step [B, num_user], each after the given code of the
        codebook before it: codebook j at that step's target, the user frame given at this
        step minus its delay (its initial token while this step <= the delay)."""
        hidden, previous, arrays, keys = state.user_slices_pending
        depformer = self.lm.depformer
        caches = depformer.new_caches()
        for cache, k, v in zip(caches, arrays[0::2], arrays[1::2], strict=True):
            cache.keys, cache.values, cache.offset = k, v, self.num_own
        t = state.steps
        history = state.user_codes
        initial = self.cfg.audio_initial_token

        def feed(k: int, token: mx.array) -> mx.array:
            j = k - self.num_own
            d = int(self._user_delays[j])
            if t <= d:
                return mx.full(token.shape, initial, dtype=token.dtype)
            return history[-1 - d][:, j]

        def sample(logits: mx.array, k: int) -> mx.array:
            return self.audio_sampler(logits, keys[2 + k])

        tokens, _ = depformer.run(hidden, previous, sample, caches,
                                  range(self.num_own, self.cfg.dep_q), feed)
        return mx.stack(tokens, axis=1)

    def _predicted_user_frame(self, state: LmStreamState, batch: int) -> mx.array:
        """[B, num_user]: the prediction of the user frame given at step t - D (t: this step,
        D: the user stream's largest delay); codebook j was predicted at step t - 1 - D + d_j,
        its initial token where that is before step 0."""
        largest = int(self._user_delays.max())
        predicted = state.user_predicted
        columns = []
        for j, d in enumerate(self._user_delays):
            back = largest - int(d)
            if back < len(predicted):
                columns.append(predicted[-1 - back][:, j])
            else:
                columns.append(mx.full((batch,), self.cfg.audio_initial_token, dtype=mx.int32))
        return mx.stack(columns, axis=1)
