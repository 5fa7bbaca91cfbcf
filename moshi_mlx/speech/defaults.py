"""CSM's sampling defaults (Sesame's generate()): the tts command's and the server's."""

TEMPERATURE = 0.9
TOP_K = 50
