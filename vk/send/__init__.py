"""vk-send: run a schedule of sessions against an OpenAI-compatible API, one response record per request.

Python API::

    from vk.send import send
    run_end = send(records, api="http://127.0.0.1:8000/v1", output="run.jsonl", workers=1)
"""

from vk.send.run import send

__all__ = ["send"]
