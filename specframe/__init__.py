"""specframe: lossless speculative decoding with pluggable drafters, controllers and verifiers."""

from .decoder import SpeculativeDecoder
from .errors import (
    ConfigError,
    ModelLoadError,
    ModelMismatchError,
    PluginContractError,
    PluginLoadError,
    SpecframeError,
    UnknownComponentError,
)
from .hookspecs import hookimpl
from .interfaces import Controller, Drafter, Verifier
from .types import Draft, GenerationResult, GenerationStats, RoundStats, SamplingConfig, Verdict

__version__ = "0.1.0"

__all__ = [
    "SpeculativeDecoder", "hookimpl", "Drafter", "Controller", "Verifier", "Draft", "Verdict",
    "RoundStats", "GenerationStats", "GenerationResult", "SamplingConfig", "SpecframeError",
    "UnknownComponentError", "PluginLoadError", "PluginContractError", "ModelMismatchError",
    "ConfigError", "ModelLoadError",
]
