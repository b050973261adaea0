"""Typed configs of every command, built one way (:func:`build_config`) and checked by each config's ``check()``."""

from mpp.config.core import (
    ConfigError,
    ScheduleConfig,
    SourceConfig,
    build_config,
    from_dict,
    load_yaml,
    settings_to_resume,
    to_dict,
)
from mpp.config.pretrain import DataConfig, ModelConfig, MonitorConfig, OptimConfig, PretrainConfig, model_overrides
from mpp.config.stages import (
    BUDGET_ALL,
    EvalDataConfig,
    EvaluateConfig,
    FinetuneConfig,
    FinetuneSettings,
    KnnConfig,
    KnnSettings,
    ProbeConfig,
    ProbeSettings,
    SemiSettings,
    StageConfig,
)

__all__ = [
    "BUDGET_ALL",
    "ConfigError",
    "DataConfig",
    "EvalDataConfig",
    "EvaluateConfig",
    "FinetuneConfig",
    "FinetuneSettings",
    "SemiSettings",
    "KnnConfig",
    "KnnSettings",
    "ModelConfig",
    "MonitorConfig",
    "OptimConfig",
    "PretrainConfig",
    "ProbeConfig",
    "ProbeSettings",
    "ScheduleConfig",
    "SourceConfig",
    "StageConfig",
    "build_config",
    "from_dict",
    "load_yaml",
    "model_overrides",
    "settings_to_resume",
    "to_dict",
]
