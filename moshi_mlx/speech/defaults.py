"""CSM's defaults: sampling (Sesame's generate(); tts and the server), batch size."""

TEMPERATURE = 0.9
TOP_K = 50
BATCH_SIZE = 8  # requests generated together by `moshi_mlx.tts --batch` (memory grows with it)
SPEAKER = 0  # the speaker id when none is given (--speaker, a batch line, the server's voice)
