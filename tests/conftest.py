"""Shared test set-up: one thread, no network, the repo on sys.path, small local fixtures.

Everything a test needs is built here in a temp dir (a tiny random AutoencoderKL saved with
save_pretrained, small image folders), so nothing ever reaches for the hub.
"""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The bf16 tests check bf16's numbers and files, not its speed: on a CPU without bf16 instructions the
# scripts refuse --precision bf16 (reference kernels, ~40x slower) unless forced, as here.
os.environ.setdefault("DIC_FORCE_BF16", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

torch.set_num_threads(1)


def subprocess_env(**extra):
    """Environment for scripts run as subprocesses (torchrun, accelerate): one thread, offline."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def load_bench_module(name):
    """bench/<name>.py as a module (bench/ is not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"dic_bench_{name}", os.path.join(REPO_ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A tiny randomly initialised AutoencoderKL (downsamples by 2, 4 latent channels), saved locally."""
    from diffusers.models import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 64), layers_per_block=1, act_fn="silu",
                        norm_num_groups=32, sample_size=32, scaling_factor=0.18215)
    path = tmp_path_factory.mktemp("tiny_vae") / "vae"
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def random_inception_weights(tmp_path_factory):
    """save_random_inception_weights(seed=0) once per session (per xdist worker): test_evaluate,
    test_evaluator and test_monitor all read this same file and none writes to it."""
    from helpers.evaluation.inception import save_random_inception_weights
    path = tmp_path_factory.mktemp("inception") / "random_inception.pth"
    return str(save_random_inception_weights(path, seed=0))


def make_image_folder(root, num_classes=2, per_class=4, size=(40, 36), seed=0):
    """ImageNet-style class folders of small random RGB PNGs; returns the root path."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        folder = os.path.join(root, f"n{c:08d}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"img_{c}_{i}.png"))
    return str(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "images")


@pytest.fixture(autouse=True)
def _autograd_stays_on():
    """Fail the test that leaves autograd off: scripts' main() run in-process must not leak it."""
    yield
    leaked = not torch.is_grad_enabled()
    torch.set_grad_enabled(True)
    assert not leaked, "this test left autograd disabled (torch.set_grad_enabled(False) leaked)"
