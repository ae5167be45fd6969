"""Named registries for what grows: loss types, data kinds, layer backends, pipeline schedules,
model specs and trainer callbacks.

A registry maps a name (the value a recipe writes, e.g. ``loss.type: dpo``) to an object or a
lazy ``"module:attribute"`` reference, so this module (and ``config.py``, which validates names
against it) imports nothing heavy. Code that adds a variant registers it once::

    from megatron_phi4.registry import LOSSES
    LOSSES.register("my_loss", "my_package.losses:MyLoss")   # or an object, or as a decorator

and every recipe can then name it; unknown names fail at configuration time with the list of
allowed ones.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable


class UnknownEntryError(ValueError):
    """A name that is not registered; the message names the field and the allowed names."""


class UnavailableEntryError(ValueError):
    """A registered name whose requirements (an optional library, hardware) are missing here."""


def module_requirement(module: str, hint: str) -> Callable[[], str | None]:
    """A check that ``module`` is importable, found without importing it (config time stays cheap)."""
    def check() -> str | None:
        import importlib.util

        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        return None if found else f"the Python package {module!r} is not installed ({hint})"
    check.__qualname__ = f"requires_{module}"
    return check


class Registry:
    def __init__(self, field: str, entries: dict[str, Any] | None = None,
                 requirements: dict[str, Callable[[], str | None] | str] | None = None):
        self.field = field  # the config field whose values this registry holds, for messages
        self._entries: dict[str, Any] = dict(entries or {})
        # name -> check (or lazy "module:attr" of one) returning None when the entry can be used on
        # this machine, else the reason it cannot (a library that is not installed, ...)
        self._requirements: dict[str, Any] = dict(requirements or {})

    def register(self, name: str, obj: Any = None, *, override: bool = False,
                 requires: Callable[[], str | None] | str | None = None) -> Any:
        """Register ``obj`` (or a ``"module:attr"`` string) under ``name``; without ``obj``, returns a
        decorator. Re-registering a name is an error unless ``override``. ``requires``: a cheap check
        (or its ``"module:attr"``) returning None if the entry is usable here, else why not; it runs at
        configuration time, so it must not import the entry's heavy dependencies."""
        if obj is None:
            def decorator(o):
                self.register(name, o, override=override, requires=requires)
                return o
            return decorator
        if name in self._entries and not override and self._entries[name] is not obj:
            raise ValueError(f"{self.field}: {name!r} is already registered (pass override=True to replace it)")
        self._entries[name] = obj
        if requires is not None:
            self._requirements[name] = requires
        return obj

    def unavailable_reason(self, name: str) -> str | None:
        """None if the registered entry ``name`` can be used on this machine, else the reason."""
        check = self._requirements.get(name)
        if check is None:
            return None
        if isinstance(check, str):
            module, _, attr = check.partition(":")
            check = getattr(importlib.import_module(module), attr)
            self._requirements[name] = check
        return check()

    def check_available(self, name: str, field: str | None = None) -> None:
        """``check`` plus the entry's availability on this machine (UnavailableEntryError)."""
        self.check(name, field)
        reason = self.unavailable_reason(name)
        if reason:
            raise UnavailableEntryError(f"{field or self.field}: {name!r} cannot be used here: {reason}")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def check(self, name: str, field: str | None = None) -> None:
        if name not in self._entries:
            raise UnknownEntryError(f"{field or self.field}: got {name!r}, allowed: "
                                    f"{', '.join(map(repr, self._entries))}")

    def get(self, name: str, field: str | None = None) -> Any:
        """The registered object, importing a lazy ``"module:attr"`` reference on first use."""
        self.check(name, field)
        obj = self._entries[name]
        if isinstance(obj, str):
            module, _, attr = obj.partition(":")
            obj = getattr(importlib.import_module(module), attr)
            self._entries[name] = obj
        return obj

    def build(self, name: str, *args, **kwargs) -> Any:
        factory: Callable = self.get(name)
        return factory(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Registry({self.field}: {', '.join(self._entries)})"


# Loss of a stage (``stages.<name>.loss.type``): factories taking the stage's LossConfig.
LOSSES = Registry("loss.type", {
    "lm": "megatron_phi4.losses.lm:build_lm_loss",
    "dpo": "megatron_phi4.losses.dpo:build_dpo_loss",
})

# Kinds of stage data (``stages.<name>.data.kind``): builders taking a
# megatron_phi4.data.sources.SourceRequest and returning a StageSource (see that module).
DATA_KINDS = Registry("data.kind", {
    "pretrain": "megatron_phi4.data.sources:build_pretrain_source",
    "sft": "megatron_phi4.data.sources:build_sft_source",
    "preference": "megatron_phi4.data.sources:build_preference_source",
    "synthetic": "megatron_phi4.data.sources:build_synthetic_source",
})

# Layer backends (``model.backend``): classes taking a ParallelContext and implementing megatron_phi4.layers.backend.LayerBackend.
# "te" (Transformer Engine) needs the transformer_engine package, which NVIDIA ships in its NGC PyTorch
# containers; without it the recipe fails at configuration time, not when the model is built.
BACKENDS = Registry("model.backend", {
    "local": "megatron_phi4.layers.local:LocalBackend",
    "te": "megatron_phi4.layers.te:TEBackend",
}, requirements={
    "te": module_requirement("transformer_engine", "Transformer Engine ships in NVIDIA's NGC PyTorch containers "
                             "(nvcr.io/nvidia/pytorch); elsewhere use model.backend: local"),
})

# Pipeline schedules (``parallel.pp_schedule``): torch.distributed.pipelining classes.
PIPELINE_SCHEDULES = Registry("parallel.pp_schedule", {
    "gpipe": "torch.distributed.pipelining:ScheduleGPipe",
    "1f1b": "torch.distributed.pipelining:Schedule1F1B",
    "interleaved_1f1b": "torch.distributed.pipelining:ScheduleInterleaved1F1B",
    "zero_bubble": "torch.distributed.pipelining:ScheduleInterleavedZeroBubble",
})

# Model architectures (``model.arch``): megatron_phi4.models.spec.ModelSpec objects.
MODELS = Registry("model.arch", {
    "phi4": "megatron_phi4.models.phi4.spec:PHI4_SPEC",
})

# Trainer callbacks a recipe can name (``callbacks: [{type: ...}]``): classes taking keyword options.
CALLBACKS = Registry("callbacks.type", {
    "nonfinite": "megatron_phi4.training.callbacks.builtin:NonFiniteStepPolicy",
    "metrics": "megatron_phi4.training.callbacks.builtin:MetricsCallback",
    "evaluation": "megatron_phi4.training.callbacks.builtin:EvaluationCallback",
    "stop_signal": "megatron_phi4.training.callbacks.builtin:StopSignalCallback",
    "checkpoint": "megatron_phi4.training.callbacks.builtin:CheckpointCallback",
})
