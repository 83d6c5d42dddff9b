"""launch/resilient.py: exit-code decisions, hostfile and exclusion syntax, and real restarts after SIGKILL."""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    REPO,
    all_tensors,
    assert_bitwise,
    fp32,
    launch,
    losses,
    ok,
    read_metrics,
    run_launch,
    run_pretrain,
    tiny_args,
)

from ds_trainer.errors import DsTrainerError
from ds_trainer.process import free_port
from ds_trainer.supervisor import (
    NO_HOST_EXIT,
    REQUEUE_EXIT,
    RESTART_LOG,
    Decision,
    Launch,
    Options,
    RestartLog,
    Supervisor,
    active_hosts,
    backoff_delay,
    decide,
    exclusion_filter,
    parse_hostfile,
    parse_options,
    read_excluded,
    split_argv,
)

# --- decisions and syntax (no launches) --------------------------------------------------------------


def test_exit_codes_decide_what_happens():
    assert REQUEUE_EXIT == 85
    assert decide(0) is Decision.SUCCESS
    assert decide(85) is Decision.PREEMPTED
    assert decide(2) is Decision.USER_ERROR
    assert [decide(c) for c in (1, 137, 247, 255)] == [Decision.FAILURE] * 4


def test_backoff_doubles_and_is_capped():
    assert [backoff_delay(n, 10, 300) for n in range(1, 8)] == [10, 20, 40, 80, 160, 300, 300]
    assert [backoff_delay(n, 0, 300) for n in (1, 5)] == [0, 0]


def test_own_options_come_first_and_the_rest_goes_to_deepspeed():
    own, ds = split_argv(["--max_restarts", "5", "--backoff=2", "--hostfile", "h", "x.py", "--backoff", "9"])
    assert own == ["--max_restarts", "5", "--backoff=2"]
    assert ds == ["--hostfile", "h", "x.py", "--backoff", "9"]  # after ours: deepspeed's and the script's
    own, ds = split_argv(["--probe_timeout", "4", "--", "--max_restarts", "x.py"])
    assert own == ["--probe_timeout", "4"] and ds == ["--max_restarts", "x.py"]
    assert parse_options(own) == Options(probe_timeout=4.0)
    with pytest.raises(DsTrainerError, match="--max_restarts must be 0 or more"):
        parse_options(["--max_restarts", "-1"])


def test_hostfile_is_read_as_deepspeed_reads_it():
    from deepspeed.launcher.runner import _parse_hostfile

    text = "# cluster\n\nnode1 slots=8\n  node2 slots=4  # spare\nnode3 slots=8\n"
    assert parse_hostfile(text) == {"node1": 8, "node2": 4, "node3": 8}
    assert list(parse_hostfile(text)) == ["node1", "node2", "node3"]  # the rank order
    assert parse_hostfile(text) == dict(_parse_hostfile(text.splitlines()))
    with pytest.raises(DsTrainerError, match=r"hostfile line 2: 'node2 gpus=4' is not 'HOST slots=N'"):
        parse_hostfile("node1 slots=1\nnode2 gpus=4\n")
    with pytest.raises(DsTrainerError, match="line 2: node1 is listed twice"):
        parse_hostfile("node1 slots=1\nnode1 slots=2\n")
    with pytest.raises(DsTrainerError, match="lists no hosts"):
        parse_hostfile("# nothing\n")


def test_exclusion_matches_deepspeeds_filter():
    from deepspeed.launcher.runner import parse_inclusion_exclusion

    hosts = {"a": 2, "b": 2, "c": 2}
    for include, exclude in [("", ""), ("", "b"), ("", "b:0"), ("", "b:0,1@c"), ("a@c:1", ""), ("b", "")]:
        want = [h for h, s in parse_inclusion_exclusion(hosts, include, exclude).items() if s]
        assert active_hosts(hosts, include, exclude) == want, (include, exclude)
    # Whole hosts join --exclude, replacing a slot-level entry for the same host (DeepSpeed would merge
    # "b:0" and "b" into slot 0 only); with --include they leave the include list instead.
    assert exclusion_filter("", "", ["b"]) == ("", "b")
    assert exclusion_filter("", "b:0@c:1", ["b", "a"]) == ("", "c:1@b@a")
    assert exclusion_filter("a@b:1", "", ["b"]) == ("a", "")
    assert active_hosts(hosts, *exclusion_filter("", "b:0@c:1", ["b", "a"])) == ["c"]


def test_launch_command_excludes_hosts_keeps_multi_node_and_moves_the_master(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("node1 slots=1\nnode2 slots=1\n")
    launch = Launch.parse(
        ["--hostfile", str(hostfile), "--master_addr", "node1", "--master_port", "1234", "launch/pretrain.py"]
        + ["--checkpoint.dir", "runs/x", "--train.max_steps", "5"]
    )
    assert launch.hosts == {"node1": 1, "node2": 1} and launch.multi_node
    assert launch.script == "launch/pretrain.py"
    assert launch.script_args == ["--checkpoint.dir", "runs/x", "--train.max_steps", "5"]
    head = [sys.executable, "-u", "-m", "deepspeed.launcher.runner"]
    assert launch.command([]) == [*head, *launch.launcher_args, launch.script, *launch.script_args]
    cmd = launch.command(["node2"])
    tail = ["launch/pretrain.py", "--checkpoint.dir", "runs/x", "--train.max_steps", "5"]
    assert cmd[len(head) :] == [
        "--hostfile", str(hostfile), "--master_port", "1234",
        "--exclude", "node2", "--master_addr", "node1", "--force_multi", *tail,
    ]  # fmt: skip
    # The master's host excluded: rank 0 moves to the first host left.
    cmd = launch.command(["node1"])
    assert cmd[cmd.index("--master_addr") + 1] == "node2" and cmd[cmd.index("--exclude") + 1] == "node1"
    assert launch.candidates(["node1", "node2"]) == []
    # DeepSpeed's own parser reads the command back as meant.
    from deepspeed.launcher.runner import parse_args

    ns = parse_args(launch.command(["node2"])[len(head) :])
    assert (ns.exclude, ns.master_addr, ns.force_multi, ns.user_script) == ("node2", "node1", True, tail[0])
    pattern = launch.rank_pattern()
    assert pattern == r"pretrain\.py --local_rank=[0-9]+ .*--checkpoint\.dir[ =]runs/x( |$)"
    lines = [
        "python -u launch/pretrain.py --local_rank=1 --checkpoint.dir runs/x --train.max_steps 5",  # a rank
        "python -u launch/pretrain.py --local_rank=1 --checkpoint.dir runs/x2",  # another run's rank
        "python -u -m deepspeed.launcher.runner launch/pretrain.py --checkpoint.dir runs/x",  # the launcher
    ]
    grep = subprocess.run(
        ["grep", "-E", pattern], input="\n".join(lines), capture_output=True, text=True, timeout=60
    )
    assert grep.stdout.splitlines() == lines[:1]  # pkill reads it as grep -E does

    with pytest.raises(DsTrainerError, match="cannot combine with --num_nodes/--num_gpus"):
        Launch.parse(["--hostfile", str(hostfile), "--num_gpus", "1", "launch/pretrain.py"])
    local = Launch.parse(["--num_gpus", "2", "launch/pretrain.py"])
    assert local.hosts is None and not local.multi_node and local.candidates([]) == ["localhost"]


class Scripted(Launch):
    """A launch whose attempts exit with the given codes, one per attempt, in plain Python processes."""

    codes: list[int]

    def command(self, excluded):
        self.seen_excluded = list(excluded)
        return [sys.executable, "-c", f"import sys; sys.exit({self.codes.pop(0)})"]


def supervise(tmp_path, codes, hosts=None, probe=None, **opts):
    launch = Scripted([], "pretrain.py", [], hosts, multi_node=hosts is not None and len(hosts) > 1)
    launch.codes = list(codes)
    sleeps: list[float] = []
    out = io.StringIO()
    sup = Supervisor(
        Options(**{"backoff": 3, "backoff_max": 10, **opts}),
        launch,
        tmp_path,
        RestartLog(tmp_path, out),
        probe=probe or (lambda *a, **k: None),
        sleep=sleeps.append,
    )
    code = sup.run()
    events = [json.loads(line) for line in (tmp_path / RESTART_LOG).read_text().splitlines()]
    return code, sleeps, events, out.getvalue(), launch


def test_loop_relaunches_failures_and_stops_on_success_preemption_and_user_error(tmp_path):
    code, sleeps, events, out, _ = supervise(tmp_path / "a", [1, 137, 0])
    assert code == 0 and sleeps == [3, 6]
    assert [e["event"] for e in events if e["event"] in ("launch", "exit", "restart", "stop")] == [
        "launch", "exit", "restart", "launch", "exit", "restart", "launch", "exit", "stop",
    ]  # fmt: skip
    assert [e["exit_code"] for e in events if e["event"] == "exit"] == [1, 137, 0]
    assert all(line.startswith("[") and "] resilient: " in line for line in out.splitlines())
    for codes, want in (([REQUEUE_EXIT], "preempted"), ([2], "user_error")):
        code, sleeps, events, _, _ = supervise(tmp_path / want, codes)
        assert (code, sleeps, events[-1]["decision"]) == (codes[0], [], want)


def test_loop_gives_up_after_max_restarts(tmp_path):
    code, sleeps, events, _, _ = supervise(tmp_path, [1, 1, 1, 1], max_restarts=2)
    assert code == 1 and sleeps == [3, 6]
    assert events[-1]["decision"] == "give_up" and events[-1]["restarts"] == 2


def test_failing_probe_excludes_the_host_and_no_host_left_is_an_error(tmp_path, capsys):
    down: set[str] = set()

    def probe(host, timeout, **kw):
        return "ssh failed: connection refused" if host in down else None

    hosts = {"node1": 1, "node2": 1}
    run = tmp_path / "run"
    code, _, _, _, launch = supervise(run, [1, 0], hosts, probe=probe)
    assert code == 0 and launch.seen_excluded == []  # every probe passed

    down.add("node2")
    code, _, events, _, launch = supervise(run, [1, 0], hosts, probe=probe)
    assert code == 0 and launch.seen_excluded == ["node2"]
    excluded = read_excluded(run)
    assert excluded == {"node2": "ssh failed: connection refused"}
    assert (run / "excluded_hosts").read_text().splitlines()[1].startswith("node2\t20")  # host, time, reason
    assert [e["host"] for e in events if e["event"] == "exclude"] == ["node2"]

    down.add("node1")  # node2 stays out (the file says so), node1 fails its probe: nothing is left
    before = len(events)
    code, sleeps, events, _, _ = supervise(run, [0], hosts, probe=probe)
    assert code == NO_HOST_EXIT and sleeps == []
    events = events[before:]
    assert events[0]["event"] == "excluded_earlier" and events[-1]["decision"] == "no_host"
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: no host left to run on: every host of the hostfile is excluded "
        "(node2: ssh failed: connection refused; node1: ssh failed: connection refused)"
    ]
    assert list(read_excluded(run)) == ["node2", "node1"]


def test_bad_arguments_are_user_errors(tmp_path):
    script = str(REPO / "launch" / "resilient.py")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [sys.executable, script, "--num_gpus", "1", "launch/pretrain.py", "--train.bogus", "1"],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr[-2000:]
    assert "train.bogus" in r.stderr
    assert not (tmp_path / "runs").exists()  # stopped before launching anything


# --- real restarts --------------------------------------------------------------------------------------


def resilient(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "launch" / "resilient.py"), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        full_env.pop(k, None)
    return run_launch(cmd, full_env, timeout)


def resilient_two_ranks(ds: str, run_dir: Path, steps: int, extra: dict, faults: str, verdict_path: Path):
    """launch/resilient.py over 2 local ranks of launch/pretrain.py, with faults to inject."""
    args = ["--backoff", "1", "--max_restarts", "2", "--num_gpus", "2", "--master_port", str(free_port())]
    args += [
        str(REPO / "launch" / "pretrain.py"),
        "--ds_config",
        ds,
        *tiny_args(run_dir, verdict_path, steps, **extra),
    ]
    return resilient(args, env={"DS_TRAINER_FAULTS": faults})


def restart_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / RESTART_LOG).read_text().splitlines()]


def first_time(run_dir: Path, step: int, after: float = 0.0) -> float:
    return min(m["time"] for m in read_metrics(run_dir) if m["step"] == step and m["time"] > after)


def recovery_timings(run_dir: Path, kill_step: int) -> dict[str, float]:
    """Seconds from the kill (the killed step's metrics line: rank 1 dies right after that step) to the
    launcher's exit, the relaunch, and the first step of the resumed run."""
    events = restart_events(run_dir)
    killed = first_time(run_dir, kill_step)
    exited = next(e["unix"] for e in events if e["event"] == "exit")
    relaunched = [e["unix"] for e in events if e["event"] == "launch"][1]
    resumed = min(m["time"] for m in read_metrics(run_dir) if m["time"] > relaunched and "train/loss" in m)
    return {
        "kill_to_launcher_exit": exited - killed,
        "kill_to_relaunch": relaunched - killed,
        "kill_to_first_resumed_step": resumed - killed,
    }


STEPS = 12
SAVE = 2


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_killed_rank_is_restarted_and_the_run_ends_bitwise_equal(tmp_path, verdict_path, stage):
    ds = str(fp32(tmp_path / "ds.json", f"zero{stage}"))
    extra = {"checkpoint.save_interval": SAVE, "checkpoint.keep_last": 0, "model.dropout": 0.1}
    kill_step = random.Random(stage).choice(range(SAVE + 1, STEPS, SAVE))  # between two saves: 5, 3
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(run_pretrain(["--ds_config", ds, *tiny_args(full, verdict_path, STEPS, **extra)], ranks=2))

    proc = resilient_two_ranks(ds, cut, STEPS, extra, f"kill@{kill_step}:1", verdict_path)
    ok(proc)
    events = restart_events(cut)
    assert [e["event"] for e in events].count("restart") == 1
    exits = [e["exit_code"] for e in events if e["event"] == "exit"]
    assert exits[0] not in (0, 2, REQUEUE_EXIT) and exits[1:] == [0]
    cleanup = next(e for e in events if e["event"] == "cleanup")
    assert cleanup["still_alive"] == []
    assert f"resumed from {cut / f'step_{kill_step - 1:08d}'} at step {kill_step - 1}" in proc.stdout

    want = losses(full)
    replayed = [(m["step"], m["train/loss"]) for m in read_metrics(cut) if "train/loss" in m]
    assert {s for s, _ in replayed} == set(range(1, STEPS + 1))
    assert all(loss == want[s] for s, loss in replayed), [(s, loss, want[s]) for s, loss in replayed]
    assert_bitwise(all_tensors(cut / f"step_{STEPS:08d}"), all_tensors(full / f"step_{STEPS:08d}"))
    timings = recovery_timings(cut, kill_step)
    print(f"zero{stage} kill@{kill_step}: leftovers {cleanup['local_leftovers']}, timings {timings}")
    assert 0 < timings["kill_to_first_resumed_step"] < 300


@pytest.mark.slow
def test_unreachable_host_is_excluded_and_the_run_finishes_on_the_other(ssh_hosts, tmp_path, verdict_path):
    """node2's rank is killed at step 5, then node2's sshd goes down (while the supervisor waits): the probe
    finds it unreachable, excludes it, and the run resumes on node1 alone with the same global batch."""
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    hostfile = ssh_hosts.write_hostfile(tmp_path / "hostfile", slots=1)
    env_file = ssh_hosts.write_env_file(tmp_path / "deepspeed_env")
    # pdsh's ssh shell starts bare: the fault reaches the ranks only through the DS_ENV_FILE.
    with open(env_file, "a") as f:
        f.write("DS_TRAINER_FAULTS=kill@5:1\n")
    run = tmp_path / "run"
    run.mkdir()
    extra = {"checkpoint.save_interval": 2, "train.micro_batch_size": 2}

    def take_node2_down_after_first_failure() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            log = run / RESTART_LOG
            if log.exists() and any(json.loads(x)["event"] == "exit" for x in log.read_text().splitlines()):
                ssh_hosts.stop_host("node2")
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=take_node2_down_after_first_failure, daemon=True)
    watcher.start()
    try:
        proc = resilient(
            ["--backoff", "8", "--probe_timeout", "20", "--max_restarts", "2"]
            + ["--hostfile", str(hostfile), "--launcher", "pdsh", "--master_addr", ssh_hosts.HOSTS["node1"]]
            + ["--master_port", str(free_port()), str(REPO / "launch" / "pretrain.py"), "--ds_config", ds]
            + tiny_args(run, verdict_path, STEPS, **extra),
            env={"DS_ENV_FILE": str(env_file)},
        )
        watcher.join(timeout=5)
    finally:
        ssh_hosts.start_host("node2")
    ok(proc)
    events = restart_events(run)
    assert [e["event"] for e in events].count("restart") == 1
    excluded = read_excluded(run)
    assert list(excluded) == ["node2"] and "ssh failed" in excluded["node2"], excluded
    launches = [e for e in events if e["event"] == "launch"]
    assert [x["hosts"] for x in launches] == [["node1", "node2"], ["node1"]]
    assert "--exclude" in launches[1]["command"] and "node2" in launches[1]["command"]
    assert "global batch 4 = 2 x 1 x 2" in proc.stdout and "global batch 4 = 2 x 2 x 1" in proc.stdout
    metrics = [m for m in read_metrics(run) if "train/loss" in m]
    assert {m["train/global_batch"] for m in metrics} == {4.0}
    tokens = {m["step"]: m["train/tokens_seen"] for m in metrics}  # the replayed step's latest value
    assert [tokens[s] for s in range(1, STEPS + 1)] == [4 * 32 * s for s in range(1, STEPS + 1)]
    timings = recovery_timings(run, 5)
    print(f"2 hosts -> 1, kill@5: timings {timings}")


@pytest.mark.slow
def test_hung_rank_is_caught_by_the_watchdog_and_the_run_finishes(tmp_path, verdict_path):
    """Rank 1 stops itself (SIGSTOP) after step 3: rank 0's watchdog dumps stacks, ends the stopped peer
    and exits; the supervisor relaunches and the run reaches its last step."""
    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    run = tmp_path / "run"
    extra = {"checkpoint.save_interval": SAVE, "train.watchdog_timeout": 10}
    proc = resilient_two_ranks(ds, run, 8, extra, "stop@3:1", verdict_path)
    ok(proc)
    events = restart_events(run)
    exits = [e["exit_code"] for e in events if e["event"] == "exit"]
    assert len(exits) == 2 and exits[0] not in (0, 2, REQUEUE_EXIT) and exits[1] == 0
    assert "(timeout 10 s); stacks:" in proc.stdout + proc.stderr
    assert "killing stopped peer process" in proc.stdout + proc.stderr
    assert f"resumed from {run / 'step_00000002'} at step 2" in proc.stdout
    assert max(m["step"] for m in read_metrics(run)) == 8


@pytest.mark.slow
def test_sigusr1_to_the_supervisor_reaches_the_ranks_and_is_not_retried(tmp_path, verdict_path):
    from helpers import rank_processes, wait_for_step

    ds = str(fp32(tmp_path / "ds.json", "zero1"))
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "launch" / "resilient.py"), "--backoff", "1", "--num_gpus", "2"]
    cmd += ["--master_port", str(free_port()), str(REPO / "launch" / "pretrain.py"), "--ds_config", ds]
    cmd += tiny_args(run, verdict_path, 400)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    sup = launch(cmd, env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = wait_for_step(run, 3)
        sup.send_signal(signal.SIGUSR1)
        assert sup.wait(timeout=120) == REQUEUE_EXIT
    finally:
        sup.kill()
    stopped = int((run / "latest").read_text().removeprefix("step_"))
    assert seen <= stopped <= seen + 2
    events = restart_events(run)
    assert [e["event"] for e in events].count("launch") == 1 and events[-1]["event"] == "stop"
    assert rank_processes(run) == []
