"""Choosing what a run resumes from, before the engine is built (the layout may depend on it).

Resume takes the newest committed checkpoint whose manifest checks out, whatever `latest` says, and
refuses one whose run identity differs. When the layout changed (ZeRO stage, data-parallel size) the
checkpoint is converted through DeepSpeed's universal format, once, by rank 0.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ds_trainer import ds_internals
from ds_trainer.checkpoint.files import (
    LATEST,
    MANIFEST,
    PARTIAL,
    UNIVERSAL_SUFFIX,
    committed,
    crc32_of,
    latest_tag,
    list_files,
    step_of_tag,
    tag_named,
    verify,
    write_manifest,
)
from ds_trainer.checkpoint.identity import compare
from ds_trainer.collectives import Group
from ds_trainer.errors import DsTrainerError, join_problems

if TYPE_CHECKING:
    from ds_trainer.ds_config import ResolvedDSConfig

BRANCHED = "branched"
"""Where a run that resumes from an older checkpoint puts the newer ones (kept, never pruned)."""

FRESH_START = "point checkpoint.dir at a new folder to start afresh"


@dataclass
class ResumePlan:
    """What resume will load, and what it found on the way (reported once the run starts)."""

    step_tag: str
    saved: dict[str, Any]
    skipped: list[str] = field(default_factory=list)
    accepted: list[str] = field(default_factory=list)
    universal: bool = False

    @property
    def load_tag(self) -> str:
        return self.step_tag + UNIVERSAL_SUFFIX if self.universal else self.step_tag

    @property
    def global_batch(self) -> int:
        return int(self.saved["ds_config"]["train_batch_size"])

    @property
    def step(self) -> int:
        return step_of_tag(self.step_tag)

    @property
    def saved_layout(self) -> dict[str, int]:
        return self.saved["meta"]["layout"]


def needs_universal(saved_layout: dict[str, int], layout: dict[str, int]) -> bool:
    """Whether DeepSpeed's own files cannot be loaded as they are on the new layout."""
    if saved_layout["zero_stage"] == layout["zero_stage"] == 0:
        return False  # ZeRO-0 saves the whole optimizer once: loads on any number of ranks
    return saved_layout != layout


def verify_shared(folder: Path, group: Group, rank: int, checksums: bool) -> str | None:
    """verify() with the checksum reads spread over the ranks; every rank gets the same answer."""
    mine = verify(folder, checksums, only=lambda i: i % group.world == rank)
    return next((r for r in group.gather(mine) if r is not None), None)


def find_resume(
    run_dir: Path,
    configs: dict[str, Any],
    group: Group,
    rank: int,
    checksums: bool,
    named: str | None = None,
) -> ResumePlan | None:
    """Collective: the newest checkpoint that checks out and is compatible (None if the folder has none), or
    the one `named` (checkpoint.resume_from) unless a branch from it is already under way."""
    candidates = committed(run_dir)
    if named is not None and not _branch_under_way(run_dir, candidates, named):
        return _named_plan(run_dir, named, candidates, configs, group, rank, checksums)
    if not candidates:
        if latest_tag(run_dir) is not None:
            raise DsTrainerError(
                f"{run_dir / LATEST} names {latest_tag(run_dir)} but no checkpoint folder is there; "
                f"restore the folders, or {FRESH_START}"
            )
        return None
    skipped = []
    for _, tag in candidates:
        reason = verify_shared(run_dir / tag, group, rank, checksums)
        if reason is not None:
            skipped.append(f"{tag}: {reason}")
            continue
        return _plan(run_dir, tag, configs, skipped)
    raise DsTrainerError(
        f"every checkpoint in {run_dir} is broken ({join_problems(skipped)}); restore one, or {FRESH_START}"
    )


def _plan(run_dir: Path, tag: str, configs: dict[str, Any], skipped: list[str]) -> ResumePlan:
    """The plan to resume from `tag`, which checked out; refused if the run's identity changed."""
    saved = {n: json.loads((run_dir / tag / f"{n}.json").read_text()) for n in configs}
    refused, accepted = compare(saved, configs)
    if refused:
        raise DsTrainerError(
            f"cannot resume {run_dir / tag}: changed since it was saved: {join_problems(refused)}; "
            f"undo the change, or {FRESH_START}"
        )
    layout = configs["meta"]["layout"]
    plan = ResumePlan(tag, saved, skipped, accepted, needs_universal(saved["meta"]["layout"], layout))
    check_convertible(plan, layout, run_dir)
    return plan


def _branch_under_way(run_dir: Path, candidates: list[tuple[int, str]], named: str) -> bool:
    """Whether the newest checkpoint was saved by a run that itself resumed from `named`: then a restart
    continues that branch instead of branching again."""
    if not candidates:
        return False
    try:
        saved = json.loads((run_dir / candidates[0][1] / "run_config.json").read_text())
    except (OSError, ValueError):
        return False  # a broken newest checkpoint is no branch to continue; verification says why later
    earlier = saved.get("checkpoint", {}).get("resume_from")
    return earlier is not None and tag_named(str(earlier)) == tag_named(named)


def _named_plan(
    run_dir: Path,
    named: str,
    candidates: list[tuple[int, str]],
    configs: dict[str, Any],
    group: Group,
    rank: int,
    checksums: bool,
) -> ResumePlan:
    tag, tags = tag_named(named), [t for _, t in candidates]
    key = f"checkpoint.resume_from={named!r}"
    if tag is None:
        raise DsTrainerError(f"{key} is neither a checkpoint tag (step_00000060) nor a step number (60)")
    if tag not in tags:
        have = ", ".join(reversed(tags)) or "none"
        raise DsTrainerError(f"{key}: {run_dir} has no checkpoint {tag} (it has: {have}); name one of those")
    reason = verify_shared(run_dir / tag, group, rank, checksums)
    if reason is not None:
        raise DsTrainerError(f"{key}: {run_dir / tag} does not check out ({reason}); name another checkpoint")
    return _plan(run_dir, tag, configs, [])


def newer_than(run_dir: Path, plan: ResumePlan) -> list[str]:
    """Committed checkpoints newer than the one resumed from: there are some only when a run branches."""
    return [tag for step, tag in committed(run_dir) if step > plan.step]


def set_aside(run_dir: Path, tags: list[str], group: Group, rank: int) -> Path:
    """Collective: move `tags` (and their universal conversions) into run_dir/branched/<time>/, where retention
    never looks, so branching keeps them; returns that folder."""
    target = run_dir / BRANCHED / time.strftime("%Y%m%d-%H%M%S", time.gmtime(group.from_rank0(time.time())))
    if rank == 0:
        target.mkdir(parents=True, exist_ok=True)
        for tag in tags:
            for folder in (run_dir / tag, run_dir / (tag + UNIVERSAL_SUFFIX)):
                if folder.exists():
                    folder.rename(target / folder.name)
    group.barrier()
    return target


def check_convertible(plan: ResumePlan, layout: dict[str, int], run_dir: Path) -> None:
    old, new = plan.saved_layout["zero_stage"], layout["zero_stage"]
    if plan.universal and (old == 0) != (new == 0):
        raise DsTrainerError(
            f"cannot resume {run_dir / plan.step_tag} (ZeRO-{old}) under ZeRO-{new}: DeepSpeed converts "
            f"between ZeRO stages 1-3 only; use a ds_config with zero_optimization.stage {'0' if old == 0 else '1-3'}"
        )


def convert_if_needed(plan: ResumePlan, run_dir: Path, zero_stage: int, group: Group, rank: int) -> None:
    """Collective: convert to DeepSpeed's universal format when the layout changed (rank 0; the others wait)."""
    if not plan.universal:
        return
    target = run_dir / plan.load_tag
    error = None
    if rank == 0 and verify(target, checksums=False) is not None:
        error = _convert(run_dir / plan.step_tag, target, zero_stage)
    error = group.from_rank0(error)
    if error:
        raise DsTrainerError(error)


def _convert(source: Path, target: Path, zero_stage: int) -> str | None:
    tmp = target.with_name(PARTIAL + target.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    try:
        ds_internals.convert_to_universal(source, tmp, zero_stage)
    except Exception as e:  # DeepSpeed's converter raises many kinds; all mean "cannot convert"
        shutil.rmtree(tmp, ignore_errors=True)
        return f"converting {source} to DeepSpeed's universal format failed: {type(e).__name__}: {e}"
    # The converter writes DeepSpeed's files only; ours (configs, RNG) travel with them.
    for f in [*source.glob("*.json"), *source.glob("rng_rank*.pt")]:
        if f.name != MANIFEST:
            shutil.copy2(f, tmp / f.name)
    write_manifest(tmp, {n: crc32_of(tmp / n) for n in list_files(tmp)})
    tmp.rename(target)
    return None


def check_resumed_lr(engine: Any, ds: ResolvedDSConfig, step: int, consumed: int) -> str | None:
    """Make sure the next update uses the schedule's learning rate for the step resumed at.

    The scheduler's position must have come back with the checkpoint (else: error). The optimizer's
    learning rate is the one saved, from the schedule as it was then; after an accepted change (e.g.
    train.max_steps, which stretches the cosine) it is set from the current schedule, and said so.
    """
    scheduler = engine.lr_scheduler
    if scheduler is None:
        return None
    iteration = consumed / ds.train_batch_size if ds.rampup_start_batch is not None else step
    position = ds_internals.schedule_position(scheduler, iteration)
    if not math.isclose(position, iteration, abs_tol=1e-9):
        raise DsTrainerError(
            f"the checkpoint's scheduler is at iteration {position} but the run resumes at step {step}; "
            "its scheduler state was not restored: resume from another checkpoint"
        )
    want = ds_internals.schedule_lr(ds.config, iteration)
    got = engine.get_lr()[0]
    if want is None or math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-15):
        return None
    scheduler.step(iteration)
    now = engine.get_lr()[0]
    if not math.isclose(now, want, rel_tol=1e-9, abs_tol=1e-15):
        raise DsTrainerError(
            f"after resuming at step {step} the learning rate is {now:.6g}, the schedule says {want:.6g}"
        )
    return f"learning rate {got:.6g} → {now:.6g}, the current schedule's value at step {step}"
