"""extract_features.py: official layout, one file pair per image over processes, byte-identical
resumes, flipped copies, corrupt images and argument errors (tiny VAE, 32x32 images, CPU)."""
import filecmp
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_image_folder, subprocess_env
import extract_features
from helpers.data.images import CorruptImageWarning, ImageFolderDataset
from helpers.data.latents import LatentFeatureDataset
from helpers.data.vae import encode, load_vae

NUM_CLASSES, PER_CLASS, SIZE = 2, 5, 32


def run_main(**kwargs):
    """extract_features.main in this process (one process, no workers)."""
    args = extract_features.build_parser().parse_args(
        [f"--{k.replace('_', '-')}={v}" for k, v in kwargs.items() if v is not True] +
        [f"--{k.replace('_', '-')}" for k, v in kwargs.items() if v is True])
    code = extract_features.run_main(extract_features.main, args)
    if code:
        raise SystemExit(code)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    """2 classes x 5 images of 40x36 plus one corrupt file (dataset index 10, class 1)."""
    root = tmp_path_factory.mktemp("extract") / "images"
    make_image_folder(root, num_classes=NUM_CLASSES, per_class=PER_CLASS, size=(40, 36))
    (root / "n00000001" / "zz_broken.png").write_bytes(b"\x89PNG broken")
    return str(root)


@pytest.fixture(scope="module")
def reference(dataset_dir, tiny_vae_dir, tmp_path_factory):
    """One uninterrupted single-process run with flipped copies."""
    out = str(tmp_path_factory.mktemp("reference"))
    with pytest.warns(CorruptImageWarning, match="zz_broken.png"):
            run_main(data_path=dataset_dir, features_path=out, image_size=SIZE, vae=tiny_vae_dir,
                 batch_size=3, num_workers=0, global_seed=7, flip=True)
    return out


def _files(root, prefix="imagenet32"):
    return {sub: sorted(os.listdir(os.path.join(root, f"{prefix}_{sub}")))
            for sub in ("features", "labels")}


def _same_files(a, b):
    files = _files(a)
    for sub, names in files.items():
        match, mismatch, errors = filecmp.cmpfiles(os.path.join(a, f"imagenet32_{sub}"),
                                                   os.path.join(b, f"imagenet32_{sub}"), names,
                                                   shallow=False)
        assert mismatch == [] and errors == [] and len(match) == len(names)
    return files == _files(b)


def test_layout_labels_and_latents(reference, dataset_dir, tiny_vae_dir, capsys):
    images = ImageFolderDataset(dataset_dir, SIZE, random_flip=False)
    assert len(images) == 11
    good = [i for i in range(11) if i != 10]                      # index 10 is the corrupt file
    expected = sorted([f"{i}.npy" for i in good] + [f"{i}_flip.npy" for i in good])
    assert _files(reference) == {"features": expected, "labels": expected}
    for i in good:
        latent = np.load(os.path.join(reference, "imagenet32_features", f"{i}.npy"))
        label = np.load(os.path.join(reference, "imagenet32_labels", f"{i}.npy"))
        assert latent.shape == (1, 4, 16, 16) and latent.dtype == np.float32
        assert label.shape == (1,) and label.dtype == np.int64 and label[0] == images.targets[i]
    assert not any(n.startswith(".") for n in os.listdir(os.path.join(reference, "imagenet32_features")))

    # the stored latent is the scaled posterior sample drawn with the image's own generator
    vae = load_vae(tiny_vae_dir)
    for i, flipped in [(0, False), (7, True)]:
        x = images.load(i, flip=flipped)[None]
        want = encode(vae, x, generator=[extract_features.image_generator(7, i, flipped)])
        name = f"{i}_flip.npy" if flipped else f"{i}.npy"
        got = np.load(os.path.join(reference, "imagenet32_features", name))
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
    plain = np.load(os.path.join(reference, "imagenet32_features", "7.npy"))
    assert np.abs(plain - got).max() > 0.01                      # the flip is really another image

    ds = LatentFeatureDataset(reference)                        # training reads flips as extra samples
    assert len(ds) == 20 and ds.latent_shape == (4, 16, 16) and ds.num_classes_seen == 2


def test_two_processes_resume_byte_identical(reference, dataset_dir, tiny_vae_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    common = dict(data_path=dataset_dir, features_path=out, image_size=SIZE, vae=tiny_vae_dir,
                  batch_size=3, num_workers=0, global_seed=7, flip=True)
    # An interrupted run: 4 of 11 images done, then a crash's debris: a truncated latent,
    # a lost label and a temp file. The restart must repair all of it.
    run_main(max_images=4, **common)
    assert len(_files(out)["features"]) == 8
    feature = os.path.join(out, "imagenet32_features", "1.npy")
    with open(feature, "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(out, "imagenet32_labels", "2_flip.npy"))
    debris = os.path.join(out, "imagenet32_features", ".partial-5.npy.999.deadbeef")
    open(debris, "wb").close()

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "extract_features.py", f"--data-path={dataset_dir}", f"--features-path={out}",
           f"--image-size={SIZE}", f"--vae={tiny_vae_dir}", "--batch-size=3", "--num-workers=1",
           "--global-seed=7", "--flip"]
    proc = subprocess.run(cmd, cwd=os.path.dirname(os.path.dirname(__file__)), env=subprocess_env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # 10 good images: 0 and 3 complete; latent 1 and flip 2 rewritten, 4..9 new; 10 corrupt
    assert "done: 7 images encoded (+7 flipped copies), 2 already present (skipped), " \
           "1 corrupt images skipped" in proc.stdout
    assert "removed 1 half-written temp files" in proc.stdout
    assert not os.path.exists(debris)
    assert _same_files(reference, out)                           # every byte as one plain run

    # a rerun writes nothing (the corrupt image is retried: it may have been fixed meanwhile)
    capsys.readouterr()
    with pytest.warns(CorruptImageWarning):
        run_main(**common)
    assert ("done: 0 images encoded (+0 flipped copies), 10 already present (skipped), "
            "1 corrupt images skipped") in capsys.readouterr().out
    assert _same_files(reference, out)


def test_resume_refuses_other_settings(reference, dataset_dir, tiny_vae_dir, tmp_path, capsys):
    out = str(tmp_path / "out")
    run_main(data_path=dataset_dir, features_path=out, image_size=SIZE, vae=tiny_vae_dir,
             batch_size=4, num_workers=0, global_seed=7, max_images=2)
    with pytest.raises(SystemExit) as e:
        run_main(data_path=dataset_dir, features_path=out, image_size=SIZE, vae=tiny_vae_dir,
                 batch_size=4, num_workers=0, global_seed=8)
    assert e.value.code == 2
    assert "made with another global_seed (7 -> 8)" in capsys.readouterr().err
    assert len(_files(out)["features"]) == 2


def test_bad_arguments(dataset_dir, tiny_vae_dir, tmp_path, capsys):
    out = tmp_path / "out"

    def error(**kwargs):
        with pytest.raises(SystemExit) as e:
            run_main(features_path=str(out), num_workers=0, **kwargs)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ")
        return err

    assert "does not exist or is not a folder" in error(data_path=tmp_path / "missing",
                                                        vae=tiny_vae_dir)
    (tmp_path / "empty").mkdir()
    assert "has no class sub-folders" in error(data_path=tmp_path / "empty", vae=tiny_vae_dir)
    assert ("--image-size 33 is not divisible by the VAE's downsampling factor 2"
            in error(data_path=dataset_dir, vae=tiny_vae_dir, image_size=33))
    assert "is neither 'ema', 'mse', 'none' nor a folder" in error(data_path=dataset_dir,
                                                                   vae=tmp_path / "no_vae")
    (tmp_path / "not_a_vae").mkdir()
    assert "cannot load the VAE" in error(data_path=dataset_dir, vae=tmp_path / "not_a_vae")
    assert not out.exists()                                      # nothing written on any error


def test_cli_missing_data_path(tmp_path, repo_root):
    proc = subprocess.run([sys.executable, "extract_features.py", "--data-path", str(tmp_path / "x"),
                           "--features-path", str(tmp_path / "out")], cwd=repo_root,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"error: data path {tmp_path / 'x'} does not "
                                   f"exist or is not a folder: pass a folder holding one sub-folder "
                                   f"of images per class")
    assert not (tmp_path / "out").exists()


def test_a_stop_signal_ends_between_blocks_with_75_and_a_rerun_finishes_the_same(reference, dataset_dir,
                                                                                 tiny_vae_dir, tmp_path, monkeypatch):
    original, calls = extract_features.encode, {"n": 0}

    def encode_then_signal(*args, **kwargs):   # SIGTERM during the first block: it is written, then stop
        calls["n"] += 1
        if calls["n"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)
    monkeypatch.setattr(extract_features, "encode", encode_then_signal)
    common = dict(data_path=dataset_dir, features_path=str(tmp_path), image_size=SIZE, vae=tiny_vae_dir,
                  batch_size=3, num_workers=0, global_seed=7, flip=True)
    with pytest.raises(SystemExit) as stopped:
        run_main(**common)
    assert stopped.value.code == 75
    assert len(_files(str(tmp_path))["features"]) == 6   # the first block of 3, plain and flipped
    monkeypatch.setattr(extract_features, "encode", original)
    with pytest.warns(CorruptImageWarning):
        run_main(**common)
    assert _same_files(reference, str(tmp_path))
