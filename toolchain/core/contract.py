"""The pass contract: what every pass receives (`BuildContext`), what it must look like (`Pass`), and
the budgets that size a build.

A pass is a class with a `name` and `run(artifact, ctx) -> artifact` (see docs/architecture.md). It
imports this module and `toolchain.core.artifact`, never `toolchain.build` (which imports every pass)
and never another pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, Protocol

from rich.console import Console

from toolchain.core.artifact import Artifact
from toolchain.core.config import BuildConfig
from toolchain.core.data import Dataset
from toolchain.core.metrics import Metric, resolve_metric
from toolchain.targets.profiles import Profile

Budget = Literal["quick", "standard", "thorough"]


@dataclass(frozen=True)
class BudgetSettings:
    max_epochs: int
    patience: int
    bench_seconds: float  # total measuring time shared by all candidates, interleaved
    bench_min_runs: int
    qat_search_seconds: float  # QAT's loss-aware range search stops here; the quantizers left keep min/max
    mixed_search_seconds: float  # mixed precision's layer scan and bisection (each step is a full quantization)


BUDGETS: dict[str, BudgetSettings] = {
    "quick": BudgetSettings(max_epochs=40, patience=6, bench_seconds=6.0, bench_min_runs=300,
                            qat_search_seconds=20.0, mixed_search_seconds=30.0),
    "standard": BudgetSettings(max_epochs=120, patience=12, bench_seconds=20.0, bench_min_runs=1000,
                               qat_search_seconds=60.0, mixed_search_seconds=120.0),
    "thorough": BudgetSettings(max_epochs=400, patience=25, bench_seconds=60.0, bench_min_runs=3000,
                               qat_search_seconds=240.0, mixed_search_seconds=600.0),
}


@dataclass
class BuildContext:
    config: BuildConfig
    profile: Profile
    dataset: Dataset
    out_dir: Path
    work_dir: Path
    seed: int = 0
    budget: Budget = "quick"
    key_path: Path | None = None
    console: Console = field(default_factory=lambda: Console(stderr=True))
    stages: list[dict[str, Any]] = field(default_factory=list)  # name, seconds: for the report
    notes: list[str] = field(default_factory=list)  # things the user should know (e.g. a key was created)
    hparams: dict[str, Any] = field(default_factory=dict)  # tuned by the search pass; read by training
    warm_start: Path | None = None  # a checkpoint of an earlier build: training fine-tunes it instead of starting afresh
    device_timer: Callable[[dict[str, Path]], dict[str, Any]] | None = None  # --measure-on: times candidates on a board

    @property
    def settings(self) -> BudgetSettings:
        return BUDGETS[self.budget]

    @cached_property
    def metric(self) -> Metric:
        """What the gate and every quality decision measure: `[eval] metric` or the task's default."""
        return resolve_metric(self.config, self.dataset.task)

    def work_path(self, name: str) -> Path:
        return self.work_dir / name


class Pass(Protocol):
    name: ClassVar[str]

    def run(self, artifact: Artifact, ctx: BuildContext) -> Artifact: ...
