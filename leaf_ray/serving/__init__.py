"""Stage 3: the focused student over an OpenAI-compatible API (``app``), and what it attends to (``focus``)."""
