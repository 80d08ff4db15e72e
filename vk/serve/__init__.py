"""vk-serve: a simulated OpenAI-compatible inference server (vLLM's API) with an engine model.

    from vk.serve import serve
    serve(port=0, ttft=0.05, tpot=0.01)              # fixed latency, blocking
    serve(port=8000, profile="llama3.1-8b-h100")     # the engine model

The engine model (for tests and what-if studies) is importable without a server::

    from vk.serve.model import Engine, EngineConfig, step_time, PROFILES
"""

from vk.serve.server import Options, serve

__all__ = ["Options", "serve"]
