"""vk: composable Unix commands for benchmarking LLM inference servers.

The pipeline, as commands and as Python::

    vk-gen synth.yaml | vk-schedule --poisson 10 | vk-send --api URL > run.jsonl ; vk-eval run.jsonl

    from vk.gen import generate          # sessions (dicts)
    from vk.schedule import schedule     # schedule header + scheduled sessions
    from vk.send import send             # runs them, writes response records
    from vk.eval import evaluate         # metrics over the records
    from vk import run_benchmark         # all four in one call (starts vk-serve when no api is given)
    from vk import sweep                 # a series of probes or a capacity search (vk-sweep)

The record formats that connect the stages are defined in ``vk.records`` and documented in ``man/vk-formats.5``.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "run_benchmark", "serving", "sweep"]


def __getattr__(name):  # lazy, so that `import vk` stays cheap for the commands
    if name in ("run_benchmark", "serving"):
        from vk import pipeline

        return getattr(pipeline, name)
    if name == "sweep":  # the vk.sweep package, callable: vk.sweep(...) is vk.sweep.sweep(...)
        import vk.sweep

        return vk.sweep
    raise AttributeError(f"module 'vk' has no attribute {name!r}")
