"""Checkpoint save and load time and GB/s of gpt2 (124M) against the raw speed of the same disk.

    python benchmarks/checkpoint_io.py [--dir /tmp/ds_trainer_checkpoint_io] [--raw_gb 2.0] [--cases 2:1,3:2]

All in one run, in one folder (so on one disk):

1. Raw disk: writes --raw_gb GB in 8 MiB blocks and fsyncs once at the end (GB/s of the whole, fsync
   included), then reads the file back in 8 MiB blocks after evicting it from the page cache
   (posix_fadvise DONTNEED on the file, then `echo 3 > /proc/sys/vm/drop_caches` if allowed; the output
   says which worked and how much of the file was still cached, by `fincore`).
2. Per case (ZeRO stage : ranks; ZeRO-2 on 1 rank runs `python launch/pretrain.py`, more ranks run under
   `deepspeed --num_gpus N`), gpt2 at context 128, micro batch 1, fp32 copy of ds_configs/zeroN.json:
   - fresh run, empty folder, max_steps 1: saves step 1. Save s = perf/checkpoint_save_s from
     metrics.jsonl: DeepSpeed's torch.save of every file, the CRC-32 of every file read back, the fsync
     of every file, the manifest and the rename (ds_trainer.checkpoint.Checkpointer.save).
     Checkpoint bytes = sum of the file sizes in step_00000001 (checked against its manifest.json).
   - the checkpoint's files are evicted from the page cache (fadvise DONTNEED on those files only: a
     global drop would also make the libraries' imports cold in the resumed run and not in the fresh).
   - resumed run, same folder, max_steps 2: loads step 1, trains step 2, saves step 2.
   Every output line is timestamped as it arrives (PYTHONUNBUFFERED=1), from the launch of the process.
   Load s = (resumed run: launch → `resumed from` line) − (fresh run: launch → `ds_trainer 0.1.0 |`
   banner line). Both lines come right after the same start-up (imports, tokenising the text, building
   the engine); the resumed run's extra part is reading the checkpoint's metadata, the CRC-32
   verification of every file (checkpoint.verify: checksum, the default; this is the cold read),
   DeepSpeed's load_checkpoint (which reads the files again, now from the page cache) and the
   learning-rate check. It also carries the run-to-run noise of that start-up (seconds on a busy CPU);
   load s* takes each run's times from its distributed-init line instead of its launch, which leaves
   out the noise of the launcher, the imports and the tokenising (not that of building the engine).
   Time to first resumed step = launch → `step 2/2` line; fresh start = launch → `step 1/1` line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "ds_trainer_torch_extensions"))

MIB = 2**20
GB = 1e9
STEP1 = "step_00000001"
# Printed by deepspeed.init_distributed on the CPU accelerator: after the imports and the tokenising,
# before the checkpoint is touched. A second anchor for the load time that leaves out their noise.
DIST_INIT = "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully"


def disk_of(path: Path) -> str:
    out = subprocess.run(["df", "-P", str(path)], capture_output=True, text=True, check=True).stdout
    fields = out.splitlines()[1].split()
    return f"{fields[0]} mounted on {fields[5]}"


def evict(paths: list[Path]) -> None:
    """Drop these files' pages from the page cache (only clean pages go: hence the fsync)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_all_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def cached_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache, by util-linux fincore; None without it."""
    if not shutil.which("fincore"):
        return None
    cmd = ["fincore", "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, paths)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return sum(int(x) for x in out.split())


@dataclass
class RawDisk:
    nbytes: int
    write_s: float
    read_s: float
    dropped_all: bool
    cached_before_read: int | None


def raw_disk(folder: Path, nbytes: int, block: int) -> RawDisk:
    path = folder / "raw_disk_test.bin"
    # Random bytes, so neither a compressing nor a deduplicating layer below can shortcut the write
    # (one block reused: generating 2 GB of randomness would cost more than writing it).
    buf = os.urandom(block)
    n_blocks = max(1, nbytes // block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(n_blocks):
            f.write(buf)
        os.fsync(f.fileno())
    write_s = time.perf_counter() - t0
    evict([path])
    dropped = drop_all_caches()
    cached = cached_bytes([path])
    view = memoryview(bytearray(block))
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(view):
            pass
    read_s = time.perf_counter() - t0
    path.unlink()
    return RawDisk(n_blocks * block, write_s, read_s, dropped, cached)


@dataclass
class Run:
    lines: list[tuple[float, str]]
    seconds: float

    def at(self, prefix: str) -> float:
        """Seconds from launch to the first line starting with `prefix`."""
        t = self.maybe(prefix)
        if t is None:
            raise RuntimeError(f"no line starting {prefix!r}; last lines:\n" + self.tail())
        return t

    def maybe(self, prefix: str) -> float | None:
        return next((t for t, line in self.lines if line.startswith(prefix)), None)

    def tail(self, n: int = 25) -> str:
        return "\n".join(line for _, line in self.lines[-n:])


def launch(cmd_args: list[str], ranks: int, verbose: bool) -> Run:
    from ds_trainer.process import free_port  # imports DeepSpeed: only once the environment above is set

    script = str(REPO / "launch" / "pretrain.py")
    if ranks == 1:
        cmd = [sys.executable, script, *cmd_args]
    else:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), script, *cmd_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    lines = []
    t0 = time.perf_counter()
    with subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            t = time.perf_counter() - t0
            line = line.rstrip("\n").strip()
            lines.append((t, line))
            if verbose:
                print(f"  {t:7.2f}s | {line}", flush=True)
        rc = proc.wait()
    run = Run(lines, time.perf_counter() - t0)
    if rc != 0:
        raise RuntimeError(f"exit {rc}: {' '.join(cmd)}\n{run.tail()}")
    return run


def launch_retrying(cmd_args: list[str], ranks: int, verbose: bool, retries: int, wait_s: float) -> Run:
    # Another engineer edits ds_trainer/ while this runs: a failure may be a half-saved file, not a bug.
    for attempt in range(retries + 1):
        try:
            return launch(cmd_args, ranks, verbose)
        except RuntimeError as e:
            if attempt == retries:
                raise
            print(f"run failed ({e}); retrying in {wait_s:.0f} s", flush=True)
            time.sleep(wait_s)
    raise AssertionError("unreachable")


def save_seconds(run_dir: Path, step: int) -> float:
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if m.get("step") == step and "perf/checkpoint_save_s" in m:
            return float(m["perf/checkpoint_save_s"])
    raise RuntimeError(f"no perf/checkpoint_save_s for step {step} in {run_dir / 'metrics.jsonl'}")


def checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file())
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    listed = {n: v["size"] for n, v in manifest.items()}
    on_disk = {p.name: p.stat().st_size for p in files if p.name != "manifest.json"}
    if listed != on_disk:
        raise RuntimeError(f"{folder}: manifest and folder disagree: {listed} vs {on_disk}")
    return files


@dataclass
class Case:
    stage: int
    ranks: int
    nbytes: int = 0
    save1_s: float = 0.0
    save2_s: float = 0.0
    fresh: dict[str, float] = field(default_factory=dict)
    resumed: dict[str, float] = field(default_factory=dict)
    fresh_init: float | None = None
    resumed_init: float | None = None
    cached_before_load: int | None = None

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage} x{self.ranks}"

    @property
    def load_s(self) -> float:
        return self.resumed["resumed"] - self.fresh["banner"]

    @property
    def load_from_init_s(self) -> float | None:
        if self.fresh_init is None or self.resumed_init is None:
            return None
        return (self.resumed["resumed"] - self.resumed_init) - (self.fresh["banner"] - self.fresh_init)


def run_case(case: Case, base: Path, context: int, verbose: bool, retries: int, wait_s: float) -> None:
    cfg = json.loads((REPO / "ds_configs" / f"zero{case.stage}.json").read_text())
    cfg["bf16"] = {"enabled": False}  # this CPU has no native bf16: emulated, it would time the emulation
    cfg_path = base / f"zero{case.stage}_fp32.json"
    cfg_path.write_text(json.dumps(cfg, indent=2))
    run_dir = base / f"zero{case.stage}_x{case.ranks}"
    shutil.rmtree(run_dir, ignore_errors=True)

    def args(steps: int) -> list[str]:
        # The fp32 config and the run folder come with every run; the rest is the command.
        return [
            "--ds_config",
            str(cfg_path),
            "--model.preset",
            "gpt2",
            "--data.path",
            str(SHARED / "data" / "tinyshakespeare.txt"),
            "--data.context_length",
            str(context),
            "--train.micro_batch_size",
            "1",
            "--train.max_steps",
            str(steps),
            "--eval.interval",
            "0",
            "--log.interval",
            "1",
            "--checkpoint.dir",
            str(run_dir),
            "--checkpoint.save_interval",
            "1",
        ]

    print(f"{case.name}: fresh run (max_steps 1, saves step 1) ...", flush=True)
    fresh = launch_retrying(args(1), case.ranks, verbose, retries, wait_s)
    case.fresh_init = fresh.maybe(DIST_INIT)
    marks = {"banner": "ds_trainer ", "step": "step 1/1 ", "saved": "saved "}
    case.fresh = {**{k: fresh.at(v) for k, v in marks.items()}, "exit": fresh.seconds}
    case.save1_s = save_seconds(run_dir, 1)
    files = checkpoint_files(run_dir / STEP1)
    case.nbytes = sum(p.stat().st_size for p in files)

    evict(files)
    case.cached_before_load = cached_bytes(files)
    print(f"{case.name}: resumed run (max_steps 2, loads step 1, saves step 2) ...", flush=True)
    resumed = launch_retrying(args(2), case.ranks, verbose, retries, wait_s)
    case.resumed_init = resumed.maybe(DIST_INIT)
    marks = {"resumed": "resumed from ", "banner": "ds_trainer ", "step": "step 2/2 ", "saved": "saved "}
    case.resumed = {
        **{k: resumed.at(v) for k, v in marks.items()},
        "exit": resumed.seconds,
    }
    case.save2_s = save_seconds(run_dir, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dir", default="/tmp/ds_trainer_checkpoint_io", help="where the test file and checkpoints go"
    )
    ap.add_argument(
        "--raw_gb", type=float, default=2.0, help="raw test size; gpt2's ZeRO-2 checkpoint is ~2.0 GB"
    )
    ap.add_argument("--block_mib", type=int, default=8)
    ap.add_argument("--cases", default="2:1,3:2", help="ZeRO stage:ranks, comma-separated")
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument(
        "--retries", type=int, default=2, help="reruns of a failed pretrain, --retry_wait s apart"
    )
    ap.add_argument("--retry_wait", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (4 GB per case)")
    ap.add_argument("--verbose", action="store_true", help="echo every timestamped line of the runs")
    a = ap.parse_args()

    base = Path(a.dir)
    base.mkdir(parents=True, exist_ok=True)
    print(f"folder {base} on {disk_of(base)}; repository on {disk_of(REPO)}")
    load_at_start = os.getloadavg()[0]
    print(f"cpus {os.cpu_count()}, load average at start {load_at_start:.2f}", flush=True)

    raw = raw_disk(base, int(a.raw_gb * GB), a.block_mib * MIB)
    write_gbs, read_gbs = raw.nbytes / GB / raw.write_s, raw.nbytes / GB / raw.read_s
    cached = (
        "n/a (no fincore)" if raw.cached_before_read is None else f"{raw.cached_before_read / MIB:.1f} MiB"
    )
    print(
        f"raw disk: {raw.nbytes / GB:.2f} GB in {a.block_mib} MiB blocks | write+fsync {raw.write_s:.2f} s = "
        f"{write_gbs:.3f} GB/s | read {raw.read_s:.2f} s = {read_gbs:.3f} GB/s (file evicted by fadvise; "
        f"drop_caches {'done' if raw.dropped_all else 'not allowed'}; still cached before the read: {cached})",
        flush=True,
    )

    # The first pretrain's imports would otherwise come cold from disk (drop_caches emptied the cache),
    # which its fresh-run figures would carry and the resumed run's would not.
    subprocess.run(
        [sys.executable, "-c", "import deepspeed, ds_trainer.pretrain"],
        cwd=REPO,
        check=True,
        capture_output=True,
    )

    cases = [Case(*map(int, c.split(":"))) for c in a.cases.split(",")]
    for case in cases:
        run_case(case, base, a.context, a.verbose, a.retries, a.retry_wait)
        c, f, r = case, case.fresh, case.resumed
        before = "n/a" if c.cached_before_load is None else f"{c.cached_before_load / MIB:.1f} MiB"
        print(
            f"  fresh:   dist init {fmt(c.fresh_init)} s, banner {f['banner']:6.1f} s, step 1/1 {f['step']:6.1f} s, "
            f"saved {f['saved']:6.1f} s, exit {f['exit']:6.1f} s | save of step 1: {c.save1_s:.2f} s = "
            f"{c.nbytes / GB / c.save1_s:.3f} GB/s"
        )
        print(
            f"  resumed: dist init {fmt(c.resumed_init)} s, resumed {r['resumed']:6.1f} s, banner {r['banner']:6.1f} s, "
            f"step 2/2 {r['step']:6.1f} s, saved {r['saved']:6.1f} s, exit {r['exit']:6.1f} s | save of step 2: "
            f"{c.save2_s:.2f} s = {c.nbytes / GB / c.save2_s:.3f} GB/s | checkpoint cached before the load: {before}",
            flush=True,
        )
        if not a.keep:
            shutil.rmtree(base / f"zero{case.stage}_x{case.ranks}", ignore_errors=True)

    print()
    print(
        f"gpt2 (124M), fp32, context {a.context}, micro batch 1, CPU; raw disk write {write_gbs:.3f} GB/s, "
        f"read {read_gbs:.3f} GB/s; load average at start {load_at_start:.2f}, now {os.getloadavg()[0]:.2f}"
    )
    header = (
        f"{'case':<10} {'ckpt GB':>7} {'save s':>6} {'save GB/s':>9} {'save/raw w':>10} {'load s':>6} "
        f"{'load GB/s':>9} {'load/raw r':>10} {'load s*':>7} {'load GB/s*':>10} {'1st resumed step s':>18} "
        f"{'fresh start s':>13}"
    )
    print(header)
    print("-" * len(header))
    for c in cases:
        gb = c.nbytes / GB
        save_gbs, load_gbs = gb / c.save1_s, gb / c.load_s
        star = c.load_from_init_s
        print(
            f"{c.name:<10} {gb:7.3f} {c.save1_s:6.2f} {save_gbs:9.3f} {save_gbs / write_gbs:10.3f} {c.load_s:6.2f} "
            f"{load_gbs:9.3f} {load_gbs / read_gbs:10.3f} {fmt(star, 7, 2)} {fmt(star and gb / star, 10, 3)} "
            f"{c.resumed['step']:18.1f} {c.fresh['step']:13.1f}"
        )
    print(
        "save s: step 1's perf/checkpoint_save_s (torch.save, CRC-32 of every file, fsync of every file, manifest, "
        "rename).\n"
        "load s: launch → `resumed from` line of the resumed run − launch → banner line of the fresh run: CRC-32 "
        "verify (the cold read), load_checkpoint (from the page cache), plus start-up noise.\n"
        "load s*: the same, each run's times taken from its distributed-init line instead of its launch "
        "(leaves out the noise of imports and tokenising, not that of building the engine).\n"
        "1st resumed step s / fresh start s: launch → `step 2/2` line of the resumed run / `step 1/1` line of "
        "the fresh run; their difference is the resume overhead."
    )


def fmt(x: float | None, width: int = 6, digits: int = 1) -> str:
    return f"{'n/a':>{width}}" if x is None else f"{x:{width}.{digits}f}"


if __name__ == "__main__":
    main()
