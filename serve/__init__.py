"""The serving side: the alignloop command line, the vLLM engine process, and (soon) the OpenAI-compatible gateway."""
