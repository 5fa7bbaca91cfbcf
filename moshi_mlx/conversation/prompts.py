"""Prompt phases before a Moshi conversation (issue 19): a voice prompt, a text prompt.

CONTRACT SKELETON (lead, 2026-12-07): the names and signatures below are what the front ends
(local, local_web, /api/chat) call; the phases helper fills in the bodies. Change a signature
only with the lead.

The phases (NVIDIA PersonaPlex's `LMGen.step_system_prompts`, our own code), every stream
forced, one LM step per 80 ms frame:
  1. voice: the recording normalized to VOICE_PROMPT_LUFS, Mimi-encoded into Moshi's own audio
     stream; text = PAD; user stream = SINE_TOKENS;
  2. PROMPT_SILENCE_S of silence: Moshi's stream = SILENCE_TOKENS, text PAD, user SINE;
  3. the text prompt, one token per frame (wrapped in system tags when the model uses them);
     Moshi's stream SILENCE, user SINE;
  4. PROMPT_SILENCE_S of silence again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Hard-coded Mimi codes (made for the released Mimi), as PersonaPlex uses them.
SINE_TOKENS = (430, 1268, 381, 1611, 1095, 1495, 56, 472)
SILENCE_TOKENS = (948, 243, 1178, 546, 1736, 1030, 1978, 2008)
PROMPT_SILENCE_S = 0.5  # each silence phase: int(0.5 * 12.5) = 6 frames
VOICE_PROMPT_LUFS = -24.0
SYSTEM_TAG = "<system>"


@dataclass(frozen=True)
class MoshiPrompt:
    """What runs before the conversation. Every field is optional; an empty prompt runs no
    phase at all (the conversation starts from silence, as without prompts).

    text: the text prompt as the user wrote it (system tags are added by the phases when the
      model uses them, see `wrap_with_system_tags`).
    voice_pcm: a 24 kHz mono float32 recording, NOT yet loudness-normalized (the phases
      normalize it).
    voice_codes: [8, T] int Mimi codes of a voice already encoded (instead of voice_pcm).
    """

    text: str | None = None
    voice_pcm: np.ndarray | None = None
    voice_codes: np.ndarray | None = None

    @property
    def empty(self) -> bool:
        return not self.text and self.voice_pcm is None and self.voice_codes is None


def wrap_with_system_tags(text: str) -> str:
    """`text` stripped, inside "<system> ... <system>" unless it already starts and ends with
    the tag."""
    raise NotImplementedError


# Engine methods the front ends call (in conversation/engine.py):
#   Engine.set_prompt(prompt: MoshiPrompt) -> None
#       run the phases now (from a fresh state) and keep the state after them; every later
#       reset() starts the conversation from that state. An empty prompt clears it.
#   Engine.save_prompt_state(path: str | Path) -> None     (safetensors, after set_prompt)
#   Engine.load_prompt_state(path: str | Path) -> None     (instead of set_prompt; a file of
#       another model or shape: PromptStateError, one line, before anything changes)
#   Engine.max_prompt_tokens -> int     (how many text tokens the context leaves a prompt)
