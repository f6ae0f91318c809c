"""`toolchain search`: one worker of a hyper-parameter search that many share.

Start it on as many machines as you like with the same config and storage (PostgreSQL for several
machines); each runs trials of the study the config names until the study has its trials, then
`toolchain build --config X --storage URL` builds the best one. The work is
`toolchain.build.workflow.join_search`; this prints the study's state when the worker is done."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from toolchain.commands.options import TargetOption
from toolchain.errors import ToolchainError

err = Console(stderr=True)


def search(
    target: TargetOption,
    config: Annotated[Path, typer.Option(help="toolchain.toml with a \\[search] section")],
    storage: Annotated[str, typer.Option(help="Optuna storage the workers share, e.g. postgresql://user@host/db")],
    n_trials: Annotated[Optional[int], typer.Option(help="trials the study should have (default: \\[search] n_trials)")] = None,
    budget: Annotated[str, typer.Option(help="quick | standard | thorough (as the build will use)")] = "quick",
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="the build's seed (part of what the study was made for)")] = 0,
) -> None:
    """Run trials of the config's search study until it has its trials (one of many workers)."""
    from toolchain.build.workflow import join_search
    from toolchain.core.config import load_config, with_search
    from toolchain.core.contract import BUDGETS
    from toolchain.passes.torch.search import owner, summary
    from toolchain.targets.profiles import resolve_target

    if budget not in BUDGETS:
        raise ToolchainError(f"--budget must be one of {', '.join(BUDGETS)}, got {budget!r}")
    if n_trials is not None and n_trials < 1:
        raise ToolchainError(f"--n-trials must be 1 or more, got {n_trials}")
    profile = resolve_target(target)
    build_config = with_search(load_config(config), storage=storage, n_trials=n_trials)
    me = owner()
    err.print(f"[bold]search worker[/] pid {me['pid']}: {build_config.project.name} ({build_config.path}) for "
              f"{profile.id}, budget {budget}, seed {seed}")
    run = join_search(build_config, profile, seed=seed, budget=budget, console=err)
    err.print(f"  {summary(run)}")
    print(f"worker pid {me['pid']} ran {run.ran} trials; study {run.plan.study_name!r} has "
          f"{sum(t.state.name in ('COMPLETE', 'PRUNED') for t in run.study.get_trials(deepcopy=False))} of "
          f"{run.plan.n_trials} done")
