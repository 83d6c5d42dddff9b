"""The Checkpointer: saves a run at its intervals and at the end, resumes it, rolls it back.

It is built with everything it saves: the engine (DeepSpeed's files), the shared state objects that
travel in DeepSpeed's client state (identical on every rank), this rank's RNGs (a file per rank) and
the configs rank 0 writes beside the weights. Every method is collective: all ranks call it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ds_trainer import ds_internals
from ds_trainer.atomic_io import write_atomic
from ds_trainer.checkpoint.files import (
    BYTES_PER_PARAMETER_ESTIMATE,
    FREE_SPACE_MARGIN,
    LATEST,
    PARTIAL,
    check_free_space,
    commit,
    committed,
    crc32_of,
    folder_bytes,
    latest_tag,
    list_files,
    prune,
    rng_file,
    sweep,
    tag_for_step,
    write_manifest,
)
from ds_trainer.checkpoint.resume import FRESH_START, ResumePlan, check_resumed_lr, find_resume
from ds_trainer.checkpoint.state import RNGState, Stateful
from ds_trainer.collectives import Group
from ds_trainer.errors import DsTrainerError

if TYPE_CHECKING:
    from ds_trainer.config import CheckpointSection
    from ds_trainer.ds_config import ResolvedDSConfig
    from ds_trainer.faults import Faults
    from ds_trainer.metrics import Metrics
    from ds_trainer.watchdog import Watchdog

CLIENT_KEY = "ds_trainer"


class Checkpointer:
    def __init__(
        self,
        engine: Any,
        settings: CheckpointSection,
        ds: ResolvedDSConfig,
        group: Group,
        rank: int,
        configs: dict[str, Any],
        shared: dict[str, Stateful],
        resume_plan: ResumePlan | None,
        metrics: Metrics,
        watchdog: Watchdog,
        faults: Faults,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.dir = Path(settings.dir)
        self.ds = ds
        self.group = group
        self.rank = rank
        self.configs = configs
        self.shared = shared
        self.plan = resume_plan
        self.metrics = metrics
        self.watchdog = watchdog
        self.faults = faults
        self.rng = RNGState()
        self.resumed_step: int | None = None
        self.saved_step: int | None = None
        self.last_save_seconds = 0.0

    # -- when to save
    def maybe_save(self, step: int, epoch_end: bool = False) -> None:
        """At every save_interval, at the last step, and (checkpoint.save_every_epoch) at each epoch's end."""
        interval = self.settings.save_interval
        due = (interval and step % interval == 0) or step == self.ds.total_steps
        if due or (epoch_end and self.settings.save_every_epoch):
            self.save_now(step)

    def save_now(self, step: int) -> None:
        """Save at `step` unless that step is saved already; says where and how long it took."""
        if self.saved_step == step:
            return
        self.watchdog.beat()
        path = self.save(step)
        self.metrics.scalars(step, {"perf/checkpoint_save_s": self.last_save_seconds})
        self.metrics.print_line(f"saved {path} in {self.last_save_seconds:.1f} s")

    # -- resume and rollback
    def resume(self) -> None:
        """Load the checkpoint chosen before the engine was built, if any, and say what changed."""
        plan = self.plan
        if plan is None:
            return
        self._load(plan)
        accepted = list(plan.accepted)
        if lr_note := check_resumed_lr(self.engine, self.ds, plan.step, self.shared["sampler"].consumed):
            accepted.append(lr_note)
        self.metrics.print_line(f"resumed from {self.dir / plan.step_tag} at step {plan.step}")
        for change in accepted:
            self.metrics.print_line(f"changed since the checkpoint (accepted): {change}")

    def roll_back(self) -> bool:
        """Load the newest good checkpoint of this run (same layout); False when there is none."""
        plan = find_resume(self.dir, self.configs, self.group, self.rank, self.settings.verify == "checksum")
        if plan is None:
            return False
        self._load(plan)
        # The caller moves the data position and the guard's counters on: the step's state is not saved.
        self.saved_step = None
        return True

    def _load(self, plan: ResumePlan) -> None:
        path, client = self.engine.load_checkpoint(str(self.dir), tag=plan.load_tag)
        if path is None:
            raise DsTrainerError(
                f"DeepSpeed could not load {self.dir / plan.load_tag}; move it aside to resume from an earlier "
                "checkpoint, or set checkpoint.resume false to start afresh"
            )
        if plan.universal and self.engine.zero_optimization_stage() == 3:
            self._restore_param_groups(self.dir / plan.load_tag)
        ds_internals.restore_swapped_optimizer_state(self.engine, str(self.dir), plan.load_tag)
        for k, o in self.shared.items():
            o.load_state_dict(client[CLIENT_KEY][k])
        rng = self.dir / plan.load_tag / rng_file(self.rank)
        if plan.saved["meta"]["world_size"] == self.group.world and rng.is_file():
            self.rng.load_state_dict(torch.load(rng, weights_only=False))
        ds_internals.replay_cpu_adam_bias_correction(self.engine)
        self.resumed_step = plan.step
        if self.rank == 0 and latest_tag(self.dir) != plan.step_tag:
            # A crash after a commit's rename left `latest` naming the step before; export reads it.
            write_atomic(self.dir / LATEST, plan.step_tag)

    def _restore_param_groups(self, universal: Path) -> None:
        saved = ds_internals.saved_param_groups(universal)
        groups = ds_internals.innermost_optimizer(self.engine).param_groups
        if len(saved) != len(groups):
            raise DsTrainerError(
                f"{universal} has {len(saved)} parameter groups, the optimizer {len(groups)}; "
                f"resume on the checkpoint's ZeRO stage, or {FRESH_START}"
            )
        ds_internals.restore_stage3_param_groups(self.engine, saved)

    # -- save
    def save(self, step: int) -> Path:
        """Write, verify-stamp and commit the checkpoint of `step`; returns its folder."""
        t0 = time.perf_counter()
        tag = tag_for_step(step)
        partial = self.dir / (PARTIAL + tag)
        self._prepare_folder(tag)
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(self.rng.state_dict(), partial / rng_file(self.rank))
        if self.rank == 0:
            for name, cfg in self.configs.items():
                (partial / f"{name}.json").write_text(json.dumps(cfg, indent=2, default=str))
        client = {CLIENT_KEY: {k: o.state_dict() for k, o in self.shared.items()}}
        self.engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client, save_latest=False)
        self.faults.in_save(step, partial, self.rank)
        self.group.barrier()  # every rank's files are written
        files = list_files(partial)
        world = self.group.world
        sums = {n: crc32_of(partial / n) for i, n in enumerate(files) if i % world == self.rank}
        gathered = self.group.gather(sums)
        if self.rank == 0:
            write_manifest(partial, {k: v for d in gathered for k, v in d.items()})
            self.faults.in_commit("kill_after_manifest", step)
            commit(partial, self.dir / tag, lambda point: self.faults.in_commit(point, step))
            self._prune()
        self.group.barrier()  # nobody reads `latest` before it names the new checkpoint
        self.last_save_seconds = time.perf_counter() - t0
        self.saved_step = step
        return self.dir / tag

    def _prepare_folder(self, tag: str) -> None:
        """Rank 0 clears what an interrupted save left and checks the disk; every rank hears the outcome."""
        problem = None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            sweep(self.dir)
            try:
                check_free_space(self.dir, self._expected_bytes(), f"checkpoint {tag}")
            except DsTrainerError as e:
                problem = str(e)
        problem = self.group.from_rank0(problem)
        if problem:
            raise DsTrainerError(problem)

    def _expected_bytes(self) -> int:
        previous = committed(self.dir)
        size = folder_bytes(self.dir / previous[0][1]) if previous else 0
        if not size:
            n = sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
            size = n * BYTES_PER_PARAMETER_ESTIMATE
        return int(size * FREE_SPACE_MARGIN)

    def _prune(self) -> None:
        steps = [s for s, _ in committed(self.dir)]
        # The checkpoint resumed from stays until a newer one is committed.
        resumed = self.resumed_step
        protected = {resumed} if resumed is not None and max(steps) <= resumed else set()
        prune(self.dir, self.settings.keep_last, self.settings.keep_every, protected)
