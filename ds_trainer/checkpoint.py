"""Crash-safe checkpoints: commit protocol, verified resume, compatibility checks, retention.

A save goes to `.partial-step_N/`; once every rank has written its files, rank 0 adds `manifest.json`
(every file with its size and CRC-32), renames the folder to `step_N/` and atomically replaces `latest`.
A crash at any moment therefore leaves either the previous checkpoint or the new one as the newest
committed folder, never a half-written one. Resume takes the newest folder whose manifest checks out.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed

from ds_trainer.atomic_io import fsync_dir, write_atomic
from ds_trainer.errors import DsTrainerError
from ds_trainer.faults import Faults

CLIENT_KEY = "ds_trainer"
LATEST = "latest"
MANIFEST = "manifest.json"
PARTIAL = ".partial-"
DELETING = ".deleting-"
UNIVERSAL_SUFFIX = "_universal"
TAG_RE = re.compile(r"^step_(\d{8,})$")
VERIFY_MODES = ("checksum", "size")
BYTES_PER_PARAMETER_ESTIMATE = 16  # fp32 weights + Adam's two moments + a master copy: the first save's guess
FREE_SPACE_MARGIN = 1.1

# Changes that make a checkpoint mean something else: refused on resume. Everything else is reported.
MODEL_FIELDS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "qkv_bias", "tie_embeddings")
DATA_FIELDS = {
    "context_length": "the training windows",
    "stride": "the training windows",
    "data_sources": "the datasets the data position counts in",
    "val_fraction": "the train/validation split",
    "seed": "the sample order the data position counts in",
}


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Progress:
    """How far the run has come; the data position lives in the sampler."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])


class RNGState:
    """This rank's random generators. DeepSpeed saves none, and dropout draws differ per rank."""

    def state_dict(self) -> dict:
        state = {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


def tag_for_step(step: int) -> str:
    return f"step_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank:05d}.pt"


# --- files -------------------------------------------------------------------------------------


def crc32_of(path: Path, chunk: int = 1 << 23) -> str:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return f"{crc:08x}"


def list_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def verify(folder: Path, checksums: bool, only: Callable[[int], bool] = lambda i: True) -> str | None:
    """Why `folder` is not a usable checkpoint, or None if it is.

    Presence and sizes are checked for every file; CRC-32s (a full read) only with `checksums`, and
    only for the files whose index passes `only`, so ranks can share that work.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        return "no manifest (the save never finished)"
    except (json.JSONDecodeError, KeyError, TypeError):
        return "unreadable manifest"
    for i, (name, want) in enumerate(sorted(files.items())):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        size = p.stat().st_size
        if size != want["size"]:
            return f"{name} has {size:,} bytes, the manifest says {want['size']:,}"
        if checksums and only(i) and crc32_of(p) != want["crc32"]:
            return f"{name} does not match its checksum"
    return None


def committed(run_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every committed-looking checkpoint folder, newest first."""
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p.name) for p in run_dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))
    ]
    return sorted(found, reverse=True)


def folder_bytes(folder: Path) -> int:
    try:
        return sum(f["size"] for f in json.loads((folder / MANIFEST).read_text())["files"].values())
    except (OSError, ValueError, KeyError):
        return 0


def check_free_space(path: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < needed:
        raise DsTrainerError(
            f"not enough disk space for {what} in {path}: need about {needed / 2**30:.2f} GiB, "
            f"{free / 2**30:.2f} GiB free; free space there, point checkpoint.dir elsewhere, "
            "or lower checkpoint.keep_last"
        )


def to_keep(steps: list[int], keep_last: int, keep_every: int, protected: set[int]) -> set[int]:
    """Retention: the newest `keep_last` (0: all), every multiple of `keep_every`, and `protected`."""
    newest = sorted(steps, reverse=True)
    keep = set(newest if keep_last <= 0 else newest[:keep_last])
    if keep_every > 0:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep | (protected & set(steps))


# --- compatibility -------------------------------------------------------------------------------


def identity_of(configs: dict[str, Any]) -> dict[str, Any]:
    """The facts a checkpoint's meaning depends on, as saved in meta.json."""
    return configs["meta"]["identity"]


def compare(saved: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(refused, accepted) differences between a checkpoint's configs and the current run's."""
    refused, accepted = [], []
    s_id, c_id = identity_of(saved), identity_of(current)
    for k in MODEL_FIELDS:
        if s_id["model"].get(k) != c_id["model"].get(k):
            refused.append(f"model.{k} {s_id['model'].get(k)} → {c_id['model'].get(k)} (the weights' shape)")
    if s_id["tokenizer"] != c_id["tokenizer"]:
        refused.append(
            f"tokenizer {s_id['tokenizer']} → {c_id['tokenizer']} (token ids would change meaning)"
        )
    for k, why in DATA_FIELDS.items():
        if s_id[k] != c_id[k]:
            refused.append(f"{k} {s_id[k]} → {c_id[k]} ({why})")
    if s_id["pipeline_stages"] != c_id["pipeline_stages"]:
        refused.append(
            f"pipeline.stages {s_id['pipeline_stages']} → {c_id['pipeline_stages']} "
            "(resume on the same number of stages, or export the weights)"
        )
    flat_s, flat_c = _flatten(saved["run_config"]), _flatten(current["run_config"])
    ignored = {
        "model",
        "data.path",
        "data.mixture",
        "data.context_length",
        "data.stride",
        "data.val_fraction",
    }
    ignored |= {"train.seed", "pipeline.stages"}
    for k in sorted(set(flat_s) | set(flat_c)):
        if any(k == i or k.startswith(i + ".") for i in ignored):
            continue
        if flat_s.get(k) != flat_c.get(k):
            accepted.append(f"{k} {flat_s.get(k)!r} → {flat_c.get(k)!r}")
    return refused, accepted


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "mixture":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


@dataclass
class ResumePlan:
    """What resume will load, decided before the engine is built (the layout may depend on it)."""

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
        return int(TAG_RE.match(self.step_tag).group(1))


def needs_universal(saved_layout: dict[str, int], layout: dict[str, int]) -> bool:
    """Whether DeepSpeed's own files cannot be loaded as they are on the new layout."""
    if saved_layout["zero_stage"] == layout["zero_stage"] == 0:
        return False  # ZeRO-0 saves the whole optimizer once: loads on any number of ranks
    return saved_layout != layout


def _add_stage3_optimizer_entry(source: Path, universal: Path) -> None:
    """ZeRO-3 reads Adam's step and the param groups from an `optimizer_state_dict` entry that the
    converter writes only for ZeRO-3 sources; a ZeRO-1/2 source keeps them in each optimizer shard."""
    shard = torch.load(next(source.glob("*_optim_states.pt")), map_location="cpu", weights_only=False)
    base = shard["optimizer_state_dict"]["base_optimizer_state"]
    path = universal / "zero" / "optimizer_state.pt"
    common = torch.load(path, map_location="cpu", weights_only=False)
    step = next(iter(base["state"].values()))["step"]
    common["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": base["param_groups"]}
    torch.save(common, path)


def _add_stage12_layout(source: Path, universal: Path) -> None:
    """The converter writes a ZeRO-3 checkpoint in a dialect ZeRO-1/2 cannot read: flat tensors instead
    of {"param": tensor} in the parameter's shape, no step per parameter, and no DeepSpeed version."""
    model_states = torch.load(next(source.glob("zero_pp_rank_0_*_model_states.pt")), weights_only=False)
    shapes = {k: v for group in model_states["param_shapes"] for k, v in group.items()}
    shard = torch.load(next(source.glob("*_optim_states.pt")), map_location="cpu", weights_only=False)
    path = universal / "zero" / "optimizer_state.pt"
    common = torch.load(path, map_location="cpu", weights_only=False)
    common.setdefault("ds_version", shard.get("ds_version"))
    step = common["optimizer_state_dict"]["state"][0]["step"]
    torch.save(common, path)
    for name, shape in shapes.items():
        folder = universal / "zero" / name
        for f in folder.glob("*.pt"):
            t = torch.load(f, map_location="cpu", weights_only=False)
            if isinstance(t, torch.Tensor):
                torch.save({"param": t.reshape(shape)}, f)
        torch.save(step, folder / "step.pt")


def _restore_stage3_param_groups(engine: Any, universal: Path) -> None:
    """DeepSpeed's ZeRO-3 universal load gives every parameter group the settings of the first one
    (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3), so the group without
    weight decay (biases, LayerNorm weights, embeddings) would be decayed from then on. Each group gets
    its own settings back from the checkpoint, as the ZeRO-1/2 load does."""
    common = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    saved = common["optimizer_state_dict"]["param_groups"]
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer  # ZeRO's wrapper holds the torch optimizer here
    if len(saved) != len(opt.param_groups):
        raise DsTrainerError(
            f"{universal} has {len(saved)} parameter groups, the optimizer {len(opt.param_groups)}; "
            "resume on the checkpoint's ZeRO stage, or point checkpoint.dir at a new folder to start afresh"
        )
    for group, settings in zip(opt.param_groups, saved, strict=True):
        group.update({k: v for k, v in settings.items() if k != "params"})


# --- the checkpointer ------------------------------------------------------------------------------


class Checkpointer:
    """Saves and resumes a run in `directory`. Every method is collective: all ranks call it.

    `shared` objects are identical on all ranks and travel in DeepSpeed's client state; each rank's
    RNG state goes to its own file; `configs` (resolved run config, DeepSpeed config, meta) are written
    beside the weights by rank 0.
    """

    def __init__(
        self,
        directory: Path,
        rank: int,
        world_size: int,
        shared: dict[str, Stateful],
        configs: dict[str, Any],
        verify_mode: str = "checksum",
        keep_last: int = 0,
        keep_every: int = 0,
        faults: Faults | None = None,
    ) -> None:
        self.dir = directory
        self.rank = rank
        self.world = world_size
        self.shared = shared
        self.rng = RNGState()
        self.configs = configs
        self.verify_mode = verify_mode
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.faults = faults
        self.resumed_step: int | None = None
        self.last_save_seconds = 0.0

    # -- collectives (a group of one needs none)
    def _barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def _gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def _from_rank0(self, obj: Any) -> Any:
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    # -- resume
    def latest_tag(self) -> str | None:
        f = self.dir / LATEST
        return f.read_text().strip() if f.is_file() else None

    def _verify_shared(self, folder: Path) -> str | None:
        """verify() with the checksum reads spread over the ranks; every rank gets the same answer."""
        checksums = self.verify_mode == "checksum"
        mine = verify(folder, checksums, only=lambda i: i % self.world == self.rank)
        return next((r for r in self._gather(mine) if r is not None), None)

    def plan_resume(self, layout: dict[str, int]) -> ResumePlan | None:
        """Find the newest checkpoint that checks out and is compatible; None if the folder has none at all."""
        candidates = committed(self.dir)
        if not candidates:
            if self.latest_tag() is not None:
                raise DsTrainerError(
                    f"{self.dir / LATEST} names {self.latest_tag()} but no checkpoint folder is there; "
                    "restore the folders, or point checkpoint.dir at a new folder to start afresh"
                )
            return None
        skipped = []
        for _, tag in candidates:
            reason = self._verify_shared(self.dir / tag)
            if reason is not None:
                skipped.append(f"{tag}: {reason}")
                continue
            saved = {n: json.loads((self.dir / tag / f"{n}.json").read_text()) for n in self.configs}
            refused, accepted = compare(saved, self.configs)
            if refused:
                raise DsTrainerError(
                    f"cannot resume {self.dir / tag}: changed since it was saved: {'; '.join(refused)}; "
                    "undo the change, or point checkpoint.dir at a new folder to start afresh"
                )
            saved_layout = saved["meta"]["layout"]
            plan = ResumePlan(tag, saved, skipped, accepted, needs_universal(saved_layout, layout))
            if plan.universal and (saved_layout["zero_stage"] == 0) != (layout["zero_stage"] == 0):
                raise DsTrainerError(
                    f"cannot resume {self.dir / tag} (ZeRO-{saved_layout['zero_stage']}) under "
                    f"ZeRO-{layout['zero_stage']}: DeepSpeed converts between ZeRO stages 1-3 only; "
                    f"use a ds_config with zero_optimization.stage {'0' if saved_layout['zero_stage'] == 0 else '1-3'}"
                )
            return plan
        raise DsTrainerError(
            f"every checkpoint in {self.dir} is broken ({'; '.join(skipped)}); "
            "restore one, or point checkpoint.dir at a new folder to start afresh"
        )

    def prepare(self, plan: ResumePlan, zero_stage: int) -> None:
        """Convert to DeepSpeed's universal format when the layout changed (rank 0; the others wait)."""
        if not plan.universal:
            return
        target = self.dir / plan.load_tag
        error = None
        if self.rank == 0 and verify(target, checksums=False) is not None:
            error = self._convert(self.dir / plan.step_tag, target, zero_stage)
        error = self._from_rank0(error)
        if error:
            raise DsTrainerError(error)

    def _convert(self, source: Path, target: Path, zero_stage: int) -> str | None:
        import argparse

        from deepspeed.checkpoint import ds_to_universal

        tmp = target.with_name(PARTIAL + target.name)
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        args = argparse.Namespace(
            input_folder=str(source),
            output_folder=str(tmp),
            num_extract_workers=1,
            num_merge_workers=1,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        try:
            ds_to_universal.main(args)
        except Exception as e:  # DeepSpeed's converter raises many kinds; all mean "cannot convert"
            shutil.rmtree(tmp, ignore_errors=True)
            return f"converting {source} to DeepSpeed's universal format failed: {type(e).__name__}: {e}"
        # DeepSpeed looks for the model-states file under the name the *loading* stage uses (ZeRO-3:
        # zero_pp_rank_0_..., else mp_rank_...), while the converter keeps the saving stage's name.
        names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
        for have, want in (names, names[::-1]):
            if (tmp / have).is_file() and not (tmp / want).exists():
                os.link(tmp / have, tmp / want)
        from_stage3 = bool(list(source.glob("zero_pp_rank_*_model_states.pt")))
        if zero_stage == 3 and not from_stage3:
            _add_stage3_optimizer_entry(source, tmp)
        elif zero_stage < 3 and from_stage3:
            _add_stage12_layout(source, tmp)
        # The converter writes DeepSpeed's files only; ours (configs, RNG) travel with them.
        for f in [*source.glob("*.json"), *source.glob("rng_rank*.pt")]:
            if f.name != MANIFEST:
                shutil.copy2(f, tmp / f.name)
        self._write_manifest(tmp, {n: crc32_of(tmp / n) for n in list_files(tmp)})
        os.rename(tmp, target)
        return None

    def load(self, engine: Any, plan: ResumePlan) -> None:
        path, client = engine.load_checkpoint(str(self.dir), tag=plan.load_tag)
        if path is None:
            raise DsTrainerError(
                f"DeepSpeed could not load {self.dir / plan.load_tag}; move it aside to resume from an earlier "
                "checkpoint, or set checkpoint.resume false to start afresh"
            )
        if plan.universal and engine.zero_optimization_stage() == 3:
            _restore_stage3_param_groups(engine, self.dir / plan.load_tag)
        for k, o in self.shared.items():
            o.load_state_dict(client[CLIENT_KEY][k])
        rng = self.dir / plan.load_tag / rng_file(self.rank)
        if plan.saved["meta"]["world_size"] == self.world and rng.is_file():
            self.rng.load_state_dict(torch.load(rng, weights_only=False))
        self.resumed_step = plan.step
        if self.rank == 0 and self.latest_tag() != plan.step_tag:
            # A crash after a commit's rename left `latest` naming the step before; export reads it.
            write_atomic(self.dir / LATEST, plan.step_tag)

    # -- save
    def save(self, engine: Any, step: int) -> Path:
        t0 = time.perf_counter()
        tag = tag_for_step(step)
        partial = self.dir / (PARTIAL + tag)
        problem = None
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._sweep()  # folders an interrupted save or prune left behind
            try:
                check_free_space(self.dir, self._expected_bytes(engine), f"checkpoint {tag}")
            except DsTrainerError as e:
                problem = str(e)
        problem = self._from_rank0(problem)
        if problem:
            raise DsTrainerError(problem)
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(self.rng.state_dict(), partial / rng_file(self.rank))
        if self.rank == 0:
            for name, cfg in self.configs.items():
                (partial / f"{name}.json").write_text(json.dumps(cfg, indent=2, default=str))
        client = {CLIENT_KEY: {k: o.state_dict() for k, o in self.shared.items()}}
        engine.save_checkpoint(str(self.dir), tag=partial.name, client_state=client, save_latest=False)
        if self.faults is not None:
            self.faults.in_save(step, partial, self.rank)
        self._barrier()  # every rank's files are written
        files = list_files(partial)
        sums = {n: crc32_of(partial / n) for i, n in enumerate(files) if i % self.world == self.rank}
        gathered = self._gather(sums)
        if self.rank == 0:
            self._write_manifest(partial, {k: v for d in gathered for k, v in d.items()})
            self._fault("kill_after_manifest", step)
            self._commit(partial, self.dir / tag, step)
            self._prune()
        self._barrier()  # nobody reads `latest` before it names the new checkpoint
        self.last_save_seconds = time.perf_counter() - t0
        return self.dir / tag

    def _expected_bytes(self, engine: Any) -> int:
        previous = committed(self.dir)
        size = folder_bytes(self.dir / previous[0][1]) if previous else 0
        if not size:
            n = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
            size = n * BYTES_PER_PARAMETER_ESTIMATE
        return int(size * FREE_SPACE_MARGIN)

    def _write_manifest(self, folder: Path, checksums: dict[str, str]) -> None:
        files = {n: {"size": (folder / n).stat().st_size, "crc32": checksums[n]} for n in sorted(checksums)}
        for n in files:  # the data reaches the disk before the manifest that vouches for it
            with open(folder / n, "rb") as f:
                os.fsync(f.fileno())
        write_atomic(folder / MANIFEST, json.dumps({"format": 1, "files": files}, indent=1))

    def _commit(self, partial: Path, final: Path, step: int) -> None:
        """The rename is the commit: resume takes the newest committed folder, whatever `latest` says."""
        if final.exists():  # the same step saved again (a rerun after a resume): the new one wins
            doomed = final.with_name(DELETING + final.name)
            os.rename(final, doomed)
            shutil.rmtree(doomed)
        os.rename(partial, final)
        fsync_dir(self.dir)
        self._fault("kill_after_rename", step)
        write_atomic(
            self.dir / LATEST, final.name, before_replace=lambda: self._fault("kill_in_latest", step)
        )

    def _fault(self, kind: str, step: int) -> None:
        if self.faults is not None:
            self.faults.in_commit(kind, step)

    def _sweep(self) -> None:
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith((PARTIAL, DELETING)):
                shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        steps = [s for s, _ in committed(self.dir)]
        # The checkpoint resumed from stays until a newer one is committed.
        resumed = self.resumed_step
        protected = {resumed} if resumed is not None and max(steps) <= resumed else set()
        keep = to_keep(steps, self.keep_last, self.keep_every, protected)
        for s in steps:
            if s in keep:
                continue
            tag = tag_for_step(s)
            for name in (tag, tag + UNIVERSAL_SUFFIX):
                if (self.dir / name).exists():
                    # Renamed first: a crash mid-delete leaves a folder that resume never considers.
                    doomed = self.dir / (DELETING + name)
                    os.rename(self.dir / name, doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
