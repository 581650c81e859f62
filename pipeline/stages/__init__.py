"""The six stages, each one module read top to bottom: its config dataclass, then `main(cfg)`.

A stage imports shared services only (pipeline/*.py, pipeline/inference/, pipeline/distill/),
never another stage (tests/test_layout.py). What it reads and writes is in its docs page.
"""

# stage -> (module, config class, what it does); a module is imported only when its stage runs.
STAGES = {
    "generate": ("pipeline.stages.generate", "GenerateConfig", "a vLLM teacher samples reasoning traces"),
    "curate": ("pipeline.stages.curate", "CurateStageConfig", "score, filter and decontaminate a traces dir again"),
    "shrink": ("pipeline.stages.shrink", "ShrinkConfig", "a student made of some of the teacher's layers"),
    "sft": ("pipeline.stages.sft", "SFTStageConfig", "fine-tune a student on traces, optionally with KD"),
    "onpolicy": ("pipeline.stages.onpolicy", "OnPolicyConfig", "the student samples, the teacher scores each token"),
    "eval": ("pipeline.stages.eval", "EvalConfig", "pass@1, pass@k, maj@k of teacher and students"),
}


def stage(name: str) -> tuple[object, type]:
    """The stage's module and config class."""
    import importlib

    module_name, class_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return module, getattr(module, class_name)
