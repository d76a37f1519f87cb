"""Configuration dataclasses: a pruning method is a schedule of :class:`Stage`\\ s.

YAML presets (``configs/*.yaml``) map 1:1 onto these dataclasses; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .registry import list_methods

POSITION_MODES = ("original", "renumber")
BUDGET_UNITS = ("image", "tile")


@dataclass
class Stage:
    """One decision point of a pruning schedule.

    Parameters
    ----------
    method : str
        Registered selector name (see :func:`vlprune.list_methods`).
    keep : int, optional
        Visual tokens kept per image (per video for video inputs). Exactly one of ``keep`` / ``ratio``.
    ratio : float, optional
        Fraction of each image's visual tokens kept, in (0, 1].
    layer : int, optional
        Index of the first decoder layer that sees only the kept tokens: ``0`` prunes before the LLM
        ("pre-LLM"), ``K > 0`` lets layers ``0..K-1`` see every token. ``None`` takes the selector's default.
    params : dict
        Keyword arguments of the selector (its dataclass fields).
    per : {"image", "tile"}
        ``"image"`` (default): the budget applies to each image, across all its tiles. ``"tile"``: to each tile of an
        image that the model tiles (LLaVA-NeXT's base tile and crops, InternVL's tiles), each chosen on its own, as
        some papers do on LLaVA-NeXT; on models without tiles the two are the same. Vision-space stages (VisionZip,
        FlowCut) choose per image tensor the tower sees either way.
    """

    method: str
    keep: int | None = None
    ratio: float | None = None
    layer: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    per: str = "image"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise TypeError(f"Stage.method must be a non-empty string, got {self.method!r}")
        if self.keep is not None and self.ratio is not None:
            raise ValueError(f"give either keep= or ratio=, not both (got keep={self.keep}, ratio={self.ratio})")
        if self.keep is None and self.ratio is None:
            raise ValueError(f"stage {self.method!r} needs a budget: keep=N (tokens per image) or ratio=r in (0, 1]")
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int):
                raise TypeError(f"keep must be an int >= 1, got {self.keep!r}")
            if self.keep < 1:
                raise ValueError(f"keep must be >= 1 visual token per image, got {self.keep}")
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)):
                raise TypeError(f"ratio must be a float in (0, 1], got {self.ratio!r}")
            if not 0.0 < float(self.ratio) <= 1.0:
                raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
            self.ratio = float(self.ratio)
        if self.layer is not None:
            if isinstance(self.layer, bool) or not isinstance(self.layer, int):
                raise TypeError(f"layer must be an int >= 0, got {self.layer!r}")
            if self.layer < 0:
                raise ValueError(f"layer must be >= 0 (0 = before the LLM), got {self.layer}")
        if not isinstance(self.params, dict):
            raise TypeError(f"Stage.params must be a dict, got {type(self.params).__name__}")
        if self.per not in BUDGET_UNITS:
            raise ValueError(f"per must be one of {BUDGET_UNITS}, got {self.per!r}")

    def budget(self, available: int) -> int:
        """Number of tokens to keep out of ``available`` (the candidate tokens of one image, or one tile)."""
        if available <= 0:
            return 0
        if self.keep is not None:
            return min(self.keep, available)
        return min(available, max(1, math.floor(self.ratio * available + 0.5)))


@dataclass
class PruneConfig:
    """A pruning method: a schedule of stages applied in increasing layer order.

    Parameters
    ----------
    stages : list of Stage
        At least one; their layers (once resolved) must be strictly increasing.
    positions : {"original", "renumber"}
        ``"original"`` (default) keeps every kept token's original position id and continues decoding after the
        unpruned length; ``"renumber"`` gives the kept tokens contiguous positions (an ablation).
    name : str, optional
        Preset name, for display.
    """

    stages: list[Stage]
    positions: str = "original"
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ValueError("PruneConfig.stages must be a non-empty list of Stage")
        self.stages = [s if isinstance(s, Stage) else _stage_from_dict(s) for s in self.stages]
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {self.positions!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        """Build from a mapping with the keys of the dataclass (as read from YAML); unknown keys are errors."""
        if not isinstance(data, dict):
            raise TypeError(f"a prune config must be a mapping, got {type(data).__name__}")
        _check_keys(data, cls, "prune config")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_keys(data: dict[str, Any], cls: type, what: str) -> None:
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {what}; allowed: {sorted(allowed)}")


def _stage_from_dict(data: Any) -> Stage:
    if not isinstance(data, dict):
        raise TypeError(f"each stage must be a Stage or a mapping, got {type(data).__name__}")
    _check_keys(data, Stage, "stage")
    return Stage(**data)


def preset_names() -> list[str]:
    """Names of the presets shipped in ``vlprune/configs``."""
    root = resources.files("vlprune.configs")
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path) -> PruneConfig:
    """Load a preset by name (``"fastv-64"``) or a YAML file by path.

    Raises
    ------
    ValueError
        If the name is neither a shipped preset nor an existing file, or the YAML has unknown keys.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        default_name = path.stem
    else:
        names = preset_names()
        if str(name_or_path) not in names:
            raise ValueError(f"unknown preset {str(name_or_path)!r}; shipped presets: {names}")
        text = resources.files("vlprune.configs").joinpath(f"{name_or_path}.yaml").read_text()
        default_name = str(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ValueError(f"config {str(name_or_path)!r} is not valid YAML: {error}") from None
    config = PruneConfig.from_dict(data)
    if config.name is None:
        config.name = default_name
    return config


def build_config(method, keep, ratio, layer, positions, params, per=None) -> PruneConfig:
    """The :class:`PruneConfig` :func:`vlprune.wrap` runs: a method name with its budget and parameters, or a preset
    (name or YAML path) or a ``PruneConfig`` with the single-stage overrides applied."""
    overrides = {k: v for k, v in (("keep", keep), ("ratio", ratio), ("layer", layer), ("per", per)) if v is not None}
    if isinstance(method, PruneConfig):
        config = method
    elif isinstance(method, (str, Path)):
        name = str(method)
        if isinstance(method, str) and name in list_methods():
            stage = Stage(name, keep=keep, ratio=ratio, layer=layer, params=dict(params), per=per or "image")
            return PruneConfig([stage], positions)
        if isinstance(method, str) and Path(name).suffix in (".yaml", ".yml") and not Path(name).is_file():
            raise ValueError(f"config file {name!r} does not exist")
        if isinstance(method, str) and name not in preset_names() and not Path(name).exists():
            raise ValueError(
                f"unknown method {name!r}; available methods: {list_methods()}; presets: {preset_names()}; "
                "or pass a path to a YAML preset"
            )
        config = load_config(method)
    else:
        raise TypeError(f"method must be a name, a path or a PruneConfig, got {type(method).__name__}")
    if overrides or params:
        if len(config.stages) != 1:
            raise ValueError(
                f"keep/ratio/layer/per/params override a single-stage method; {config.name!r} has "
                f"{len(config.stages)} stages: edit its PruneConfig instead"
            )
        stage = config.stages[0]
        budget = (
            {"keep": keep, "ratio": ratio}
            if ("keep" in overrides or "ratio" in overrides)
            else {"keep": stage.keep, "ratio": stage.ratio}
        )
        stage = Stage(
            stage.method,
            **budget,
            layer=overrides.get("layer", stage.layer),
            params={**stage.params, **params},
            per=overrides.get("per", stage.per),
        )
        config = PruneConfig([stage], config.positions, config.name)
    return PruneConfig(list(config.stages), positions if positions != "original" else config.positions, config.name)
