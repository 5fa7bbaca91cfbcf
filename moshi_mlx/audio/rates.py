"""The audio clock every model family shares through Mimi: 24 kHz mono, 1920-sample frames
(80 ms, 12.5 frames per second)."""

SAMPLE_RATE = 24000
FRAME_SIZE = 1920
FRAME_RATE = SAMPLE_RATE / FRAME_SIZE  # 12.5 Hz
