"""The OpenAI-compatible gateway in front of vLLM, and nothing else: settings, the OpenAI protocol models, the chat
logic, thin FastAPI routes, the proxy to one or more vLLM servers (started here in embedded mode), alias-to-version
routing for hot-swapped LoRA adapters, authentication and limits, the record of every answer and its feedback, the
admin endpoints and metrics. `alignloop serve` and `alignloop up` run it (alignloop.launch).
"""
