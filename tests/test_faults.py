"""Issue 13, faults and bad data: atomic publishing, file modes, stale temps, writability checks,
one writer per folder, and workers that die with their launcher."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO_ROOT, subprocess_env
from helpers.utils.cli import JobError
from helpers.utils.files import (OutputExistsError, atomic_write, atomic_write_text, check_writable,
                           remove_stale_temps)
from helpers.utils.distributed import exit_with_parent
from helpers.utils.locks import RunLock


def _gone(pid):
    """True once `pid` has exited (a zombie nobody reaps counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_gone(pids, seconds=10.0):
    deadline = time.time() + seconds
    while time.time() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if not _gone(p)]


#################################################################################
#                                 helpers.utils.files                                 #
#################################################################################

@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain.txt", "w") as f:
            f.write("x")
        atomic_write_text(tmp_path / "atomic.txt", "x")
        atomic_write_text(tmp_path / "atomic.txt", "y", overwrite=True)
    finally:
        os.umask(old)
    plain = os.stat(tmp_path / "plain.txt").st_mode & 0o777
    assert plain == 0o666 & ~umask
    assert os.stat(tmp_path / "atomic.txt").st_mode & 0o777 == plain


def test_atomic_write_refusal_is_atomic_even_when_the_early_check_misses(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    path.write_text("first writer")
    # a second writer whose existence check ran before the first writer published
    monkeypatch.setattr(os.path, "exists", lambda p: False)
    monkeypatch.setattr(os.path, "lexists", lambda p: False)
    with pytest.raises(JobError, match="ckpt.pt already exists: refusing to overwrite"):
        atomic_write_text(path, "second writer")
    monkeypatch.undo()
    assert path.read_text() == "first writer"
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]


def test_exists_error_is_a_job_error_and_a_file_exists_error(tmp_path):
    atomic_write_text(tmp_path / "a.json", "{}")
    with pytest.raises(OutputExistsError) as info:
        atomic_write(tmp_path / "a.json", lambda tmp: None)
    assert isinstance(info.value, FileExistsError) and info.value.code == 2
    assert "\n" not in str(info.value)


def test_remove_stale_temps_takes_only_its_own_pattern(tmp_path):
    for name in (".tmp-abc.pt", ".tmp-def.npz", "0001000.pt", ".partial-x.npy", "notes.tmp-1"):
        (tmp_path / name).write_text("x")
    assert remove_stale_temps(tmp_path) == 2
    assert sorted(os.listdir(tmp_path)) == [".partial-x.npy", "0001000.pt", "notes.tmp-1"]
    assert remove_stale_temps(tmp_path / "missing") == 0


def test_check_writable_creates_the_folder_and_names_an_impossible_one(tmp_path):
    assert check_writable(tmp_path / "out" / "ref.npz") == str(tmp_path / "out")
    assert os.listdir(tmp_path / "out") == []                      # the probe is gone
    assert check_writable(tmp_path / "samples", folder=True) == str(tmp_path / "samples")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(JobError, match=r"cannot write to .*afile.*choose a writable"):
        check_writable(tmp_path / "afile" / "sub" / "out.npz")


#################################################################################
#                                 helpers.utils.locks                                 #
#################################################################################

HOLDER = textwrap.dedent("""
    import sys, time
    from helpers.utils.locks import RunLock
    lock = RunLock(sys.argv[1], what="training run").acquire()
    print("locked", flush=True)
    time.sleep(120)
""")


def _start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE,
                            text=True, env=subprocess_env(), cwd=REPO_ROOT)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_job_is_refused_naming_the_holder_and_gets_the_lock_once_it_is_killed(tmp_path):
    holder = _start_holder(tmp_path / "run")
    try:
        with pytest.raises(JobError) as info:
            RunLock(tmp_path / "run", what="training run").acquire()
        message = str(info.value)
        assert f"pid {holder.pid} on " in message and "-c" in message
        assert "being written by another training run job" in message and "\n" not in message
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path / "run") as lock:          # the kernel dropped the dead holder's lock
        assert lock.held
        record = json.loads(open(lock.path).read())
        assert record["pid"] == os.getpid()
    assert not lock.held and not os.path.exists(lock.path)        # nothing left behind


def test_two_locks_in_one_process_conflict_and_release_lets_the_next_in(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(JobError, match=f"pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()


PARENT = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], start_new_session=True)
    print(child.pid, flush=True)
    time.sleep(120)
""")
CHILD = textwrap.dedent("""
    import time
    from helpers.utils.distributed import exit_with_parent
    exit_with_parent()
    time.sleep(120)
""")


def test_a_child_in_its_own_session_dies_with_its_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], stdout=subprocess.PIPE,
                              text=True, env=subprocess_env(), cwd=REPO_ROOT)
    child = int(parent.stdout.readline())
    time.sleep(3.0)                          # the child has imported helpers.utils.locks and called it
    assert not _gone(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    left = _wait_gone([child], 10.0)
    if left:
        os.kill(child, signal.SIGKILL)
    assert not left, "the child outlived its killed parent"


def test_exit_with_parent_reports_its_mechanism():
    assert exit_with_parent(signal.SIGTERM) in ("prctl", "poll")


WORKER = textwrap.dedent("""
    import os, sys, time
    from helpers.utils.distributed import exit_with_parent
    exit_with_parent()
    with open(os.path.join(sys.argv[1], os.environ["RANK"]), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(120)
""")


def test_killing_torchrun_leaves_no_live_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    pids_dir = tmp_path / "pids"
    pids_dir.mkdir()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(script), str(pids_dir)], env=subprocess_env(), cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 90
    while time.time() < deadline and len(os.listdir(pids_dir)) < 2:
        time.sleep(0.2)
    workers = [int((pids_dir / r).read_text()) for r in sorted(os.listdir(pids_dir))]
    try:
        assert len(workers) == 2
        os.killpg(launcher.pid, signal.SIGKILL)          # torchrun's whole process group
        launcher.wait()
        left = _wait_gone(workers, 10.0)
        assert not left, f"workers {left} outlived the killed torchrun"
    finally:
        for pid in workers:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


#################################################################################
#                                 helpers.data.images                                #
#################################################################################

def test_a_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
    import numpy as np
    from PIL import Image
    from helpers.data.images import load_image
    Image.fromarray(np.full((6, 6), 30000, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb.shape == (6, 6, 3) and (rgb == 117).all()          # 30000 / 65535 * 255 = 116.7
    assert (np.asarray(load_image(tmp_path / "g16.png", channels=1)) == 117).all()


def test_every_mode_converts_to_the_expected_rgb(tmp_path):
    import numpy as np
    from PIL import Image
    from helpers.data.images import to_mode, to_rgb
    assert np.asarray(to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32), "F")))[0, 0, 0] == 128
    assert np.asarray(to_rgb(Image.new("I", (2, 2), 65535)))[0, 0, 0] == 255
    assert tuple(np.asarray(to_rgb(Image.new("LA", (2, 2), (90, 0))))[0, 0]) == (90, 90, 90)
    assert tuple(np.asarray(to_rgb(Image.new("RGBA", (2, 2), (1, 2, 3, 0))))[0, 0]) == (1, 2, 3)
    assert tuple(np.asarray(to_rgb(Image.new("CMYK", (2, 2), (0, 0, 0, 0))))[0, 0]) == (255, 255, 255)
    assert np.asarray(to_rgb(Image.new("1", (2, 2), 1)))[0, 0, 0] == 255
    palette = Image.new("P", (2, 2), 1)
    palette.putpalette([0, 0, 0, 200, 10, 20] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "p.png")
    with Image.open(tmp_path / "p.png") as img:
        assert tuple(np.asarray(to_rgb(img))[0, 0]) == (200, 10, 20)
    assert to_mode(Image.new("I;16", (2, 2), 0), "L").mode == "L"


def test_an_empty_class_folder_is_named_or_keeps_its_index(tmp_path):
    from PIL import Image
    from helpers.data.images import ImageFolderDataset
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    for name in ("a", "c"):
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    with pytest.raises(JobError, match=r"class folder .*/b holds no images.*--allow-empty-classes"):
        ImageFolderDataset(tmp_path, 8)
    data = ImageFolderDataset(tmp_path, 8, allow_empty_classes=True)
    assert data.classes == ["a", "b", "c"] and data.targets == [0, 2]


#################################################################################
#                            helpers.data.latents: bad data                          #
#################################################################################

def _latent_set(root, count=40, nan_at=None):
    """A per-file set of `count` (4, 2, 2) latents, labels index % 10, NaN in latent `nan_at`."""
    import numpy as np
    from helpers.data.per_file_writer import write_latent
    for i in range(count):
        latent = np.full((4, 2, 2), i, dtype=np.float32)
        if i == nan_at:
            latent[1, 0, 1] = np.nan
        write_latent(root, str(i), latent, i % 10)
    return root


def test_a_nan_latent_is_named_on_read_and_skip_nonfinite_trains_past_it(tmp_path):
    import torch
    from helpers.data.images import collate_skip_none
    from helpers.data.latents import LatentFeatureDataset
    _latent_set(tmp_path, nan_at=37)
    data = LatentFeatureDataset(tmp_path)
    assert data[36][0][0, 0, 0].item() == 36.0
    with pytest.raises(JobError, match=r"latent file .*imagenet256_features/37\.npy holds "
                                       r"non-finite values .*--skip-nonfinite"):
        data[37]
    data = LatentFeatureDataset(tmp_path, skip_nonfinite=True)
    loader = torch.utils.data.DataLoader(data, batch_size=8, collate_fn=collate_skip_none)
    seen = torch.cat([x[:, 0, 0, 0] for x, _ in loader])
    assert seen.tolist() == [float(i) for i in range(40) if i != 37]
    assert data.skipped_nonfinite == {37}


def test_a_nan_latent_stops_packing_and_a_packed_nan_is_found_at_start_up(tmp_path):
    import numpy as np
    from helpers.data.latents import LatentFeatureDataset
    from helpers.data.packing import pack_latents
    _latent_set(tmp_path, nan_at=37)
    with pytest.raises(JobError, match=r"latent file .*features/37\.npy holds non-finite"):
        pack_latents(tmp_path, progress=False, log=lambda *a: None)
    assert not os.path.exists(tmp_path / "imagenet256_packed")
    np.save(tmp_path / "imagenet256_features" / "37.npy", np.zeros((1, 4, 2, 2), np.float32))
    packed = pack_latents(tmp_path, progress=False, log=lambda *a: None)
    latents = np.load(os.path.join(packed, "latents.npy"), mmap_mode="r+")
    latents[37, 2, 1, 1] = np.inf
    latents.flush()
    del latents
    with pytest.raises(JobError, match=r"packed latent set .*imagenet256_packed row 37 \(from "
                                       r"37\.npy\) holds non-finite"):
        LatentFeatureDataset(tmp_path, layout="packed")
    data = LatentFeatureDataset(tmp_path, layout="packed", skip_nonfinite=True)
    assert data[37] is None and data[38][1].item() == 8 and data.skipped_nonfinite == {37}


@pytest.mark.parametrize("value, dtype, message", [
    (3.7, "float64", r"holds 3\.7 \(float64\): labels must be integer"),
    (float("nan"), "float32", r"holds nan \(float32\): labels must be integer"),
    (-1, "int64", r"holds label -1, outside \[0, 10\)"),
    (10, "int64", r"holds label 10, outside \[0, 10\)"),
])
def test_bad_label_files_are_refused_naming_the_file(tmp_path, value, dtype, message):
    import numpy as np
    from helpers.data.latents import LatentFeatureDataset
    _latent_set(tmp_path, count=12)
    np.save(tmp_path / "imagenet256_labels" / "7.npy", np.array([value], dtype=dtype))
    data = LatentFeatureDataset(tmp_path)
    with pytest.raises(JobError, match=r"label file .*imagenet256_labels/7\.npy " + message):
        data.check_labels(10)
    with pytest.raises(JobError, match=r"labels/7\.npy"):
        LatentFeatureDataset(tmp_path, num_classes=10)[7]


def test_a_packed_label_out_of_range_is_named_with_its_row(tmp_path):
    import numpy as np
    from helpers.data.latents import LatentFeatureDataset
    from helpers.data.packing import pack_latents
    _latent_set(tmp_path, count=12)
    packed = pack_latents(tmp_path, progress=False, log=lambda *a: None)
    labels = np.load(os.path.join(packed, "labels.npy"), mmap_mode="r+")
    labels[5] = 10
    labels.flush()
    del labels
    data = LatentFeatureDataset(tmp_path)
    with pytest.raises(JobError, match=r"row 5 \(from 5\.npy\) holds label 10, outside \[0, 10\)"):
        data.check_labels(10)
    assert data.check_labels(11)[5] == 10


#################################################################################
#                              convert_features.py                              #
#################################################################################

def test_convert_says_nothing_to_do_and_never_publishes_a_temp_file(tmp_path, capsys, monkeypatch):
    import convert_features
    from helpers.data.latents import LatentFeatureDataset
    from helpers.data.packing import pack_latents
    _latent_set(tmp_path, count=12)
    real_read = LatentFeatureDataset._read_latent

    def killed_at_row_6(self, name):
        if name == "6.npy":
            raise KeyboardInterrupt("kill -9")
        return real_read(self, name)

    monkeypatch.setattr(LatentFeatureDataset, "_read_latent", killed_at_row_6)
    with pytest.raises(KeyboardInterrupt):
        pack_latents(tmp_path, chunk_size=2, workers=1, progress=False, log=lambda *a: None)
    monkeypatch.undo()
    work = tmp_path / ".partial-imagenet256_packed"
    (work / ".tmp-k1ll3d.json").write_text("{half")            # an atomic write killed midway
    (work / "stray.txt").write_text("x")

    def convert(*argv):
        args = convert_features.build_parser().parse_args(["--quiet", "--feature-path",
                                                           str(tmp_path), *argv])
        return convert_features.run_main(convert_features.main, args)

    assert convert() == 0
    packed = tmp_path / "imagenet256_packed"
    assert sorted(os.listdir(packed)) == ["info.json", "labels.npy", "latents.npy", "names.txt"]
    assert "done: 12 latents" in capsys.readouterr().out
    assert convert() == 0                                        # finished: nothing to do
    out = capsys.readouterr().out
    assert f"nothing to do: {packed} already holds these 12 latents" in out and "done: 12" in out


#################################################################################
#                              extract_features.py                              #
#################################################################################

def test_extract_features_locks_cleans_temps_and_refuses_old_seeds(tmp_path, tiny_vae_dir, capsys):
    import extract_features
    from PIL import Image
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        Image.new("RGB", (8, 8), (40, 80, 120)).save(tmp_path / "data" / c / "x.png")
    out = tmp_path / "out"

    def extract():
        args = extract_features.build_parser().parse_args(
            ["--data-path", str(tmp_path / "data"), "--features-path", str(out), "--image-size", "8",
             "--vae", str(tiny_vae_dir), "--batch-size", "2", "--num-workers", "0"])
        return extract_features.run_main(extract_features.main, args)

    with RunLock(out, what="feature extraction"):
        assert extract() == 2
    assert f"being written by another feature extraction job: pid {os.getpid()} on " in \
        capsys.readouterr().err
    (out / ".tmp-k1ll3d.json").write_text("{half")
    assert extract() == 0
    assert sorted(os.listdir(out)) == ["imagenet8_extract.json", "imagenet8_features",
                                       "imagenet8_labels"]
    meta_path = out / "imagenet8_extract.json"
    meta = json.loads(meta_path.read_text())
    assert meta["seed_rule"] == "derive_seed"
    del meta["seed_rule"]                                    # a folder made with the old seeds
    meta_path.write_text(json.dumps(meta))
    assert extract() == 2
    assert "made with another seed_rule (None -> 'derive_seed')" in capsys.readouterr().err


#################################################################################
#                                  evaluate.py                                  #
#################################################################################

class _Exploit:
    """A pickle that would create a file when unpickled without weights_only."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_evaluate_refuses_a_pickle_that_runs_code_and_checks_the_output_first(tmp_path):
    import numpy as np
    import torch
    import evaluate
    weights = tmp_path / "evil.pth"
    torch.save({"w": _Exploit(str(tmp_path / "pwned"))}, weights)
    images = np.zeros((6, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "real.npz", arr_0=images)

    def make_ref(out):
        return evaluate.main(evaluate.build_parser().parse_args(
            ["--make-ref", str(tmp_path / "real.npz"), "--out", str(out), "--image-size", "8",
             "--inception-weights", str(weights), "--device", "cpu"]))

    with pytest.raises(JobError, match=r"evil\.pth is not a plain weights file .*"
                                              r"weights-inception-2015-12-05"):
        make_ref(tmp_path / "ref.npz")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(JobError, match=r"cannot write to .*afile"):   # before any loading
        make_ref(tmp_path / "afile" / "ref.npz")
