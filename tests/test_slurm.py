"""`snakemake --profile slurm` against a real SLURM on loopback (tests/slurm_cluster.py), with the
profile `make slurm-profile` installs (edited for the test cluster as a site would edit it) and
the workflow profile profiles/default:
the sample DAG goes through sbatch (sacct lists the jobs), a killed filter job is finished by
`--rerun-incomplete` without recomputing any finished shard, and the outputs equal the local
profile's."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import CLUSTER, SlurmCluster, _left_by_dead_test_cluster

from conftest import ROOT, job_counts
from groundset.core.reproduce import differences

pytestmark = pytest.mark.workflow
SLURM = ["--profile", "slurm"]  # as the design card says: the user profile named slurm
# Outputs compared with the local run (paths inside records are made workdir-relative).
COMPARED = [
    "merged/merged_output.jsonl",
    "merged/aes_6.jsonl",
    "captioned/captioned.jsonl",
    "masked/masked.jsonl",
    "export/emu3/list/datalist.jsonl",
    "export/stats/stats.json",
    "export/stage_counts.json",
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node SLURM with accounting, stopped (by PID) when the module's tests are done."""
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a killed pytest still stops daemons
    try:
        # the node offers more memory than this machine has (config_overrides): jobs ask for
        # what the workflow profile gives them (32 GB for the model jobs), four at once
        with SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4, memory_mb=160000) as running:
            print(
                f"SLURM setup: {running.setup_seconds:.1f} s (install {running.install_seconds:.1f} s)"
            )
            yield running
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.fixture(scope="module")
def site_profile(tmp_path_factory) -> Path:
    """XDG_CONFIG_HOME holding the `slurm` profile `make slurm-profile` installs, edited for the
    test cluster with profiles/slurm-ci (each of its keys replaces the installed one)."""
    xdg = tmp_path_factory.mktemp("xdg")
    env = {**os.environ, "XDG_CONFIG_HOME": str(xdg)}
    make = ["make", "-s", "-C", str(ROOT), "slurm-profile"]
    subprocess.run(make, env=env, check=True, capture_output=True)
    installed = xdg / "snakemake" / "slurm"
    assert (installed / "partitions.yaml").read_text() == (
        ROOT / "profiles" / "slurm" / "partitions.yaml"
    ).read_text()
    config = yaml.safe_load((installed / "config.yaml").read_text())
    config.update(yaml.safe_load((ROOT / "profiles" / "slurm-ci" / "config.yaml").read_text()))
    (installed / "config.yaml").write_text(yaml.safe_dump(config))
    ci = ROOT / "profiles" / "slurm-ci" / "partitions.yaml"
    (installed / "partitions.yaml").write_text(ci.read_text())
    again = subprocess.run(make, env=env, capture_output=True, text=True)
    assert again.returncode != 0 and "not overwriting" in again.stderr  # a site's edits stay
    assert (installed / "partitions.yaml").read_text() == ci.read_text()
    return xdg


def _interrupt(signum, frame):
    """SIGTERM unwinds like Ctrl-C, so that the fixture's cleanup runs."""
    raise KeyboardInterrupt


class Run:
    """The real snakemake CLI with the SLURM profiles, in the background; its output in a file."""

    def __init__(self, cluster, xdg: Path, args: list[str], log: Path, timeout: int = 900):
        # Snakemake ignores SIGTERM while it polls SLURM: `timeout` stops it with SIGINT.
        cmd = ["timeout", "-s", "INT", str(timeout), sys.executable, "-m", "snakemake",
               "--snakefile", str(ROOT / "Snakefile"), *SLURM, *args]  # fmt: skip
        env = {**cluster.env(), "NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled",
               "XDG_CONFIG_HOME": str(xdg)}  # fmt: skip
        self.log = log
        with open(log, "w") as out:  # a file, not a pipe: nobody reads it while we watch squeue
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        """Interrupt snakemake if it still runs (a failed test must not leave it polling)."""
        if self.running():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def running(self) -> bool:
        """Whether snakemake is still running."""
        return self.proc.poll() is None

    def finish(self, timeout: int = 900) -> tuple[int, str]:
        """Wait for the end: (exit code, output)."""
        code = self.proc.wait(timeout=timeout)
        return code, self.log.read_text()


def normalized(path: Path, workdir: Path) -> list:
    """A JSON / JSONL output with the workdir taken out of paths and per-request ids dropped."""
    text = path.read_text().replace(str(workdir), "<workdir>")
    if path.suffix == ".json":
        return [json.loads(text)]
    records = [json.loads(line) for line in text.splitlines()]
    for record in records:  # the stand-in served by the jobs vs the sample's in-process one
        for key in ("request_id", "backend", "model"):
            record.get("caption_meta", {}).pop(key, None)
    return records


def wait_for_running_filter_job(cluster, run: Run, timeout: float = 600) -> tuple[str, str]:
    """(job id, comment) of the first score_shard job SLURM runs, once its step has started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert run.running(), run.log.read_text()
        queue = cluster.run("squeue", "-h", "-o", "%i|%T|%k").stdout.split("\n")
        for line in queue:
            if line.count("|") == 2:
                job, state, comment = line.split("|")
                if (
                    state == "RUNNING"
                    and comment.startswith("rule_score_shard")
                    and step_pids(cluster, job)
                ):
                    return job, comment
        time.sleep(0.5)
    raise AssertionError("no score_shard job ran on SLURM")


def step_pids(cluster, job: str) -> list[int]:
    """PIDs of the processes of a job's steps (what runs the rule), from `scontrol listpids`."""
    done = cluster.run("scontrol", "listpids", job, check=False)
    pids = []
    for line in done.stdout.splitlines()[1:]:  # PID JOBID STEPID LOCALID GLOBALID
        fields = line.split()
        if len(fields) >= 3 and fields[0].isdigit() and fields[2] not in ("batch", "extern"):
            pids.append(int(fields[0]))
    return pids


def kill_step(cluster, job: str) -> list[int]:
    """kill -9 every process of the job's step, as when its node loses it."""
    pids = step_pids(cluster, job)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


@pytest.mark.xdist_group("slurm")
def test_sample_on_slurm_survives_a_killed_job_and_matches_the_local_run(
    cluster, site_profile, sample_run_later, tmp_path
):
    workdir = tmp_path / "results"
    # a CPU-only cluster: the GPU rules ask for none (config keys; outputs do not depend on
    # them); the caption jobs start their own server (the stand-in, as vLLM would be started)
    requests = tmp_path / "requests.jsonl"
    serve = {"command": f"{sys.executable} -m groundset.testing.vlm --port {{port}} "
                        f"--request-log {requests}",
             "instances": 2, "gpus": 0, "cpus": 1, "mem_mb": 1000}  # fmt: skip
    cpu_only = tmp_path / "cpu_only.yaml"
    cpu_only.write_text(
        yaml.safe_dump(
            {
                "mask": {"gpus": 0},
                "export": {"emu3": {"gpus": 0}},
                "caption": {
                    "backend": "openai",
                    "model": "stand-in",
                    "stand_in": False,
                    "serve": serve,
                },
            }
        )  # fmt: skip
    )
    args = ["--configfile", "config/sample.yaml", str(cpu_only), "--config", f"workdir={workdir}",
            "--slurm-logdir", str(tmp_path / "slurm-logs")]  # fmt: skip
    started = time.monotonic()
    first = Run(cluster, site_profile, args, tmp_path / "first.log")
    try:
        job, comment = wait_for_running_filter_job(cluster, first)
        assert kill_step(cluster, job)  # the shard's job step dies mid-shard
        code, output = first.finish()
    finally:
        first.stop()
    first_seconds = time.monotonic() - started
    assert code != 0, output
    assert "Error in rule score_shard" in output
    # the user profile `slurm` and the workflow profile, which gives the model jobs 32 GB; the
    # plugin picks the partition from the installed profile's partitions.yaml
    assert re.search(
        r"Using profiles? slurm and workflow specific profile \S*profiles/default", output
    )
    assert "Auto-selected partition 'debug'" in output
    memory = cluster.run("sacct", "-X", "-n", "-P", "-o", "Comment,ReqMem").stdout
    assert re.search(r"rule_score_shard\S*\|32000M", memory), memory
    pattern = r"rule_score_shard_wildcards_(.+)_([0-9a-f]{8})_(\d+)"  # source, download part, shard
    source, part, shard = re.fullmatch(pattern, comment).groups()
    killed = workdir / "filtered" / source / part / f"shard_{shard}.jsonl"
    assert not killed.exists()
    finished = {p: p.stat().st_mtime_ns for p in (workdir / "filtered").glob("*/*/shard_*.jsonl")}
    assert finished, "no other shard finished: keep-going did not carry on"

    started = time.monotonic()
    rerun = Run(cluster, site_profile, [*args, "--rerun-incomplete"], tmp_path / "rerun.log")
    try:
        code, output = rerun.finish()
    finally:
        rerun.stop()
    rerun_seconds = time.monotonic() - started
    assert code == 0, output
    planned = job_counts(output)
    assert planned.get("score_shard") == 1, planned  # only the killed shard
    assert "download_part" not in planned and "index_shards" not in planned, planned
    assert killed.exists()
    assert {p: p.stat().st_mtime_ns for p in finished} == finished  # no finished shard recomputed

    # every job went through SLURM and its accounting: sacct lists them by rule
    accounted = cluster.run(
        "sacct", "-X", "-n", "-P", "-o", "JobID,State,Comment"
    ).stdout.splitlines()
    states: dict[str, list[str]] = {}
    for line in accounted:
        _, state, rule_comment = line.split("|", 2)
        rule = re.match(r"rule_(\w+?)_wildcards|rule_(\w+)$", rule_comment)
        if rule:
            states.setdefault(rule.group(1) or rule.group(2), []).append(state)
    for rule in ("download_part", "score_shard", "caption_chunk", "mask_chunk", "emu3_part"):
        assert "COMPLETED" in states.get(rule, []), (rule, accounted)
    # the sample's URL lists in parts of 10 rows: two download parts per source, each a job
    assert states["download_part"] == ["COMPLETED"] * 4, states["download_part"]
    assert "FAILED" in states["score_shard"], states["score_shard"]  # the killed one
    assert "stage_counts" not in states  # a local rule: runs in the snakemake process

    # the caption jobs' servers answered every request and none outlived its job
    served = [json.loads(line) for line in requests.read_text().splitlines()]
    pids = {line["pid"] for line in served}
    assert served and len(pids) >= 2, pids  # one server per caption job
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z", pid

    sample_run = sample_run_later()  # the local run (another xdist worker's, or run now)
    for name in COMPARED:  # SLURM gives score jobs 1 thread, the local run 2: the guarantee
        ours, local = workdir / name, sample_run["snapshot"] / name
        assert not differences(
            normalized(ours, workdir), normalized(local, sample_run["workdir"]), name
        )
    print(
        f"SLURM sample: first run {first_seconds:.0f} s (one job killed), rerun {rerun_seconds:.0f} s"
    )


def test_a_stale_link_of_a_killed_test_cluster_is_replaced_and_a_real_config_is_not(tmp_path):
    """/etc/slurm/slurm.conf left by a killed test run is stale; a site's config never is."""
    link = tmp_path / "slurm.conf"
    root = tmp_path / "old-cluster"
    (root / "etc").mkdir(parents=True)
    (root / "run").mkdir()
    conf = root / "etc" / "slurm.conf"
    conf.write_text(f"ClusterName={CLUSTER}\nSlurmctldPidFile={root / 'run' / 'slurmctld.pid'}\n")
    link.symlink_to(tmp_path / "gone" / "slurm.conf")
    assert _left_by_dead_test_cluster(link)  # dangling: pytest removed the old temp dir
    link.unlink()
    link.symlink_to(conf)
    assert _left_by_dead_test_cluster(link)  # no daemon of that cluster runs
    # a live "slurmctld" whose parent (this test) still runs: another session's cluster
    daemon = tmp_path / "slurmctld"
    daemon.write_bytes(Path("/bin/sleep").read_bytes())
    daemon.chmod(0o755)
    with subprocess.Popen([str(daemon), "60"]) as proc:
        try:
            (root / "run" / "slurmctld.pid").write_text(f"{proc.pid}\n")
            comm = Path(f"/proc/{proc.pid}/comm")
            deadline = time.monotonic() + 10  # a loaded machine may show the name late
            while comm.read_text().strip() != "slurmctld" and time.monotonic() < deadline:
                time.sleep(0.05)
            seen = comm.read_text().strip(), Path(f"/proc/{proc.pid}/stat").read_text()
            assert not _left_by_dead_test_cluster(link), seen
            assert proc.poll() is None  # and it was not touched
        finally:
            proc.kill()
    site = tmp_path / "site.conf"
    site.write_text("ClusterName=production\n")
    link.unlink()
    link.symlink_to(site)
    assert not _left_by_dead_test_cluster(link)
