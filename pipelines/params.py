"""params.yaml -> the typed configs of every step, with presets and strict checking.

`load_params()` reads the file, lays the chosen preset's overrides over the step sections, and
builds `PipelineParams` with `components.config.from_dict`: an unknown or mistyped key anywhere,
in a preset too, is a ConfigError naming `params.yaml: <dotted.key>`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.compress.config import DistillConfig, QuantizeConfig
from components.config import MAX_YAML_BYTES, ConfigError, from_dict, load_yaml, merge, to_dict
from components.data.config import FilterConfig, GenerateConfig, SourceConfig, SplitConfig, ValidateConfig
from components.model import ModelConfig
from components.registry.config import RegistryConfig
from components.serve.config import ServeConfig
from components.train.config import EvaluateConfig, FinetuneConfig, ReinforceConfig, TokenizerConfig, TrainConfig
from pipelines.cluster import ClusterConfig

REPO_PARAMS = Path(__file__).resolve().parent.parent / "params.yaml"


@dataclass
class PipelineParams:
    """Every step's config; one field per section of params.yaml."""

    source: SourceConfig = field(default_factory=SourceConfig)
    """How raw records map onto the canonical row."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """The built-in synthetic sample set."""
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    """The Great Expectations gate."""
    filter: FilterConfig = field(default_factory=FilterConfig)
    """De-duplication, quality, label noise, weights."""
    split: SplitConfig = field(default_factory=SplitConfig)
    """Train / val / test assignment."""
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer trained with the base stage."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The language model's architecture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The base training stage on DeepSpeed."""
    reinforce: ReinforceConfig = field(default_factory=ReinforceConfig)
    """The reinforcement stage (GRPO with verifiable rewards)."""
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    """The supervised fine-tune stage (top layers)."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """Held-out evaluation of every stage."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Teacher -> smaller student (logit distillation)."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """INT8 weights and KV cache."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """Triton: the model repository export, the local server, serve.check and the load test."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """The GTO model registry and the promotion gate."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Kubernetes: GPUs, volumes, secrets, retries of the compiled pipeline and the training job
    (compile and render time only; a local run ignores it)."""

    def as_dict(self) -> dict[str, Any]:
        return to_dict(self)


def default_params_path() -> Path:
    """params.yaml in the working folder, else $DISTILLERY_PARAMS, else the repository's own."""
    for candidate in (Path("params.yaml"), Path(os.environ.get("DISTILLERY_PARAMS", "")), REPO_PARAMS):
        if candidate.name and candidate.is_file():
            return candidate
    raise ConfigError("no params.yaml found (looked in the working folder, $DISTILLERY_PARAMS and the repository)")


def conf_dir(path: Path) -> Path | None:
    """The Hydra config folder that composes the params file `path`: `conf/` beside it."""
    conf = path.resolve().parent / "conf"
    return conf if (conf / "config.yaml").is_file() else None


def compose(conf: Path, preset: str, overrides: list[str] = ()) -> dict[str, Any]:
    """conf/config.yaml with conf/preset/<preset>.yaml laid over it (and Hydra `overrides`), as a
    plain mapping: exactly what DVC writes to params.yaml for `dvc exp run -S preset=<preset>`
    (it calls the same Hydra compose)."""
    known = sorted(p.stem for p in (conf / "preset").glob("*.yaml"))
    if preset not in known:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(known) or 'none'} ({conf / 'preset'})")
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    for path in sorted(conf.rglob("*.yaml")):  # the same bounds as params.yaml, before Hydra reads them
        _load(path)
    try:
        with initialize_config_dir(str(conf.resolve()), version_base=None):
            cfg = hydra_compose(config_name="config", overrides=[f"preset={preset}", *overrides])
        return OmegaConf.to_container(cfg, resolve=True)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{conf}: cannot compose preset {preset!r}: {str(err).splitlines()[0]}") from None


def _load(path: Path) -> Any:
    """A parameters file, read within components.config.load_yaml's bounds (no aliases, ...)."""
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes; parameters are at most {MAX_YAML_BYTES:,}")
        return load_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read parameters: {err}") from None


def _read(path: Path) -> dict[str, Any]:
    raw = _load(path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_params(path: str | os.PathLike | None = None, preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> tuple[PipelineParams, str]:
    """(params, preset name). Without `preset`: the params file as it is (DVC's view: what
    `dvc params diff` shows is what runs). With `preset`: composed from the Hydra folder beside
    the file (`conf_dir`), the file itself not read. A file of its own with a `presets:` mapping
    (overrides by name, laid over its sections) picks from that instead. `overrides` (--set) go
    on top; every key is checked against the step configs."""
    path = Path(path) if path else default_params_path()
    raw = _read(path)
    where = str(path)
    if "presets" in raw:
        raw, chosen = _pick_preset(path, raw, preset)
    elif preset:
        conf = conf_dir(path)
        if conf is None:
            raise ConfigError(f"--preset {preset}: {path} has no presets and no conf/ folder beside it to compose "
                              f"one from; drop --preset to use the file as it is")
        raw, chosen, where = compose(conf, preset), preset, f"{conf}/preset/{preset}.yaml"
    else:
        chosen = raw.get("preset") or "custom"
    raw.pop("preset", None)
    merged = merge(PipelineParams, raw, overrides) if overrides else raw
    try:
        return from_dict(PipelineParams, merged), chosen
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _pick_preset(path: Path, raw: dict[str, Any], preset: str | None) -> tuple[dict[str, Any], str]:
    """A params file with its own `presets:` mapping: the chosen one (`preset`, else the file's
    `preset:` key, else small) laid over the file's sections; every preset is checked."""
    presets = raw.pop("presets", {}) or {}
    chosen = preset or raw.pop("preset", None) or "small"
    raw.pop("preset", None)
    if not isinstance(presets, dict):
        raise ConfigError(f"{path}: presets: expected a mapping of preset name -> overrides")
    try:
        from_dict(PipelineParams, raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for name, over in presets.items():  # every preset is checked, not only the chosen one
        try:
            from_dict(PipelineParams, merge(PipelineParams, raw, over or {}))
        except ConfigError as err:
            raise ConfigError(f"{path}: presets.{name}.{err}") from None
    if chosen not in presets:
        raise ConfigError(f"{path}: unknown preset {chosen!r}; known: {', '.join(presets) or 'none'}")
    return merge(PipelineParams, raw, presets[chosen] or {}), chosen


def preset_names(path: str | os.PathLike | None = None) -> list[str]:
    """The presets `--preset` offers with this params file: its own `presets:`, or the Hydra
    folder's (conf/preset/*.yaml: tiny, small, base for the repository's own)."""
    path = Path(path) if path else default_params_path()
    raw = _read(path)
    if isinstance(raw.get("presets"), dict):
        return list(raw["presets"])
    conf = conf_dir(path)
    return sorted(p.stem for p in (conf / "preset").glob("*.yaml")) if conf else []
