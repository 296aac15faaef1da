"""scripts/slurm_train.sh: valid bash, and the srun/torchrun command it builds, run against stub
srun and scontrol commands (no SLURM needed)."""
import os
import signal
import subprocess
import time

from conftest import REPO_ROOT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "slurm_train.sh")


def stub(folder, name, body):
    path = folder / name
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(0o755)


def stubs(tmp_path, srun_body=None):
    stub(tmp_path, "srun", srun_body or f'printf "%s\\n" "$@" > {tmp_path / "srun_args"}')
    # coreutils printf writes both lines in one write() (bash's builtin printf may write line by line, and
    # the script's `| head -n 1` under pipefail then fails with SIGPIPE, 141, when head exits in between).
    stub(tmp_path, "scontrol", f'echo "$@" >> {tmp_path / "scontrol_calls"}; '
                               f'exec /usr/bin/printf "gpu-node-07\\ngpu-node-08\\n"')
    return {"PATH": f"{tmp_path}:/usr/bin:/bin", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NODELIST": "gpu-node-[07-08]"}


def run_script(tmp_path, *args, **env):
    return subprocess.run(["bash", SCRIPT, *args], env={**stubs(tmp_path), **env}, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=30)


def test_script_is_valid_bash():
    result = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    text = open(SCRIPT).read()
    assert "#SBATCH --gpus-per-node=8" in text and '--nnodes "$SLURM_NNODES"' in text


def test_builds_the_multi_node_torchrun_command(tmp_path):
    result = run_script(tmp_path, "--max-steps", "100", FEATURE_PATH="/data/features")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "srun_args").read_text().splitlines() == [
        "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2",
        "--signals-to-handle", "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout", "240",
        "--nproc_per_node", "8",
        "--rdzv_id", "4242", "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-node-07:29500",
        "train.py", "--model", "DiC-XL", "--feature-path", "/data/features", "--results-dir",
        "results", "--resume", "auto", "--max-steps", "100"]


def test_missing_feature_path_is_one_line(tmp_path):
    result = run_script(tmp_path)
    assert result.returncode != 0 and not (tmp_path / "srun_args").exists()
    assert result.stderr.strip().endswith(
        "FEATURE_PATH: set FEATURE_PATH to the folder written by extract_features.py")


def test_usr1_is_forwarded_to_srun_and_the_job_requeued(tmp_path):
    """SLURM's --signal=B:USR1 reaches the batch shell only: it forwards it to srun (which exits 1, as
    torchrun does after forwarding it) and requeues the job."""
    text = open(SCRIPT).read()
    assert "#SBATCH --signal=B:USR1@300" in text and "#SBATCH --requeue" in text
    got = tmp_path / "srun_got"
    env = {**stubs(tmp_path, f"trap 'echo USR1 > {got}; exit 1' USR1\n"
                             f"touch {tmp_path / 'started'}; for i in $(seq 300); do sleep 0.1; done"),
           "FEATURE_PATH": "/data/features"}
    job = subprocess.Popen(["bash", SCRIPT], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    end = time.time() + 20
    while not (tmp_path / "started").exists() and time.time() < end:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)
    out, err = job.communicate(timeout=30)
    assert job.returncode == 0, err
    assert got.read_text() == "USR1\n"
    assert (tmp_path / "scontrol_calls").read_text().splitlines()[-1] == "requeue 4242"
    assert "requeueing it to continue with --resume auto" in out
