"""ADM's Inception features (pool_3, mixed_6/conv spatial, logits) in PyTorch, and loading them.

As in OpenAI's guided-diffusion evaluation suite (`evaluations/evaluator.py`), with TensorFlow
replaced by torch-fidelity's port of the same 2015 InceptionV3 graph (the metrics computed from
these features: helpers/evaluation/metrics.py):

- Features: `InceptionV3Features` runs torch-fidelity's `FeatureExtractorInceptionV3`, which
  reproduces the TF graph's bilinear resize to 299 (TF1 semantics), (x - 128) / 128 scaling and
  TF-style pooling. ADM's three taps:
    * `pool_3:0` (2048-d)               -> torch-fidelity feature "2048";
    * `softmax/logits/MatMul` (no bias) -> torch-fidelity feature "logits_unbiased" (1008 classes);
      ADM's softmax is over these 1008 logits;
    * `mixed_6/conv:0`, first 7 channels, 17x17, flattened in TF's (H, W, C) order (2023-d)
      -> a forward hook on `Mixed_6d.branch1x1` (conv + BN + ReLU: torch-fidelity's own weight
      converter maps TF `mixed_6/conv/*` to `Mixed_6d.branch1x1.*`, and the TF op named by the
      bare scope `mixed_6/conv` is that unit's ReLU), channels [:7], permuted to (H, W, C) and
      flattened. The (H, W, C) order matters: it is the coordinate order of the `mu_s`/`sigma_s`
      stored in ADM's reference batches.
  The network weights are the converted TF weights, so features agree with ADM's to float32
  round-off (torch-fidelity reports its resize as bit-exact on CPU); this could not be checked
  here against the TF graph itself (no internet, no TF). On CUDA we turn TF32 off so the
  convolutions run in true float32 like the TF graph.
"""
import os
import sys
import tempfile

import numpy as np
import torch

from helpers.utils.cli import JobError, one_line

# ADM's constants.
POOL_DIM = 2048                 # pool_3 features
SPATIAL_CHANNELS = 7            # mixed_6/conv:0[..., :7]
SPATIAL_SIDE = 17               # 17 x 17 grid at the mixed_6 stage
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE  # 2023
NUM_LOGITS = 1008               # the 2015 graph's softmax width
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # torch-fidelity's name of TF's mixed_6/conv unit


def first_line(exc):
    """The exception's type and the first line of its message, for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class InceptionV3Features:
    """ADM's Inception taps from torch-fidelity's TF-compatible InceptionV3.

    Called on a uint8 batch (N, H, W, 3) (any H, W: the network resizes to 299 like TF), returns
    {"pool": (N, 2048), "spatial": (N, 2023), "logits": (N, 1008)} float32 NumPy arrays.
    `weights_path`: torch-fidelity's `pt_inception-2015-12-05` state_dict; None downloads it.
    Tests may pass any callable with the same contract instead of this class.
    """

    def __init__(self, weights_path=None, device="cpu"):
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        if weights_path is not None and not os.path.isfile(weights_path):
            raise JobError(f"Inception weights {weights_path} do not exist: pass the path "
                                  f"of torch-fidelity's weights-inception-2015-12-05 .pth file")
        self.device = torch.device(device)
        if self.device.type == "cuda":          # true float32 convolutions, like the TF graph
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        try:
            model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                feature_extractor_weights_path=weights_path)
        except Exception as e:  # noqa: BLE001 - download, unpickling or key mismatch: one message
            where = weights_path or "torch-fidelity's download"
            raise JobError(f"cannot load InceptionV3 weights from {where} ({first_line(e)}); "
                                  f"offline, pass --inception-weights PATH") from e
        self.model = model.to(self.device).eval()
        self._spatial = None
        self.model.get_submodule(SPATIAL_MODULE).register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output):
        # output: (N, 192, 17, 17) after BN + ReLU -> first 7 channels, TF's (H, W, C) order
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1)

    @torch.no_grad()
    def __call__(self, images):
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).to(self.device)  # (N, H, W, 3)
        x = x.permute(0, 3, 1, 2)                                            # (N, 3, H, W)
        pool, logits = self.model(x)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool.float().cpu().numpy(), "spatial": spatial.float().cpu().numpy(),
                "logits": logits.float().cpu().numpy()}


def save_random_inception_weights(path, seed=0, calibration_images=2, calibration_size=32):
    """FOR TESTS ONLY: a randomly initialised InceptionV3 state_dict in torch-fidelity's format.

    Its BatchNorm statistics are set from one pass over random noise images so the features have
    unit scale (plain random init shrinks them to ~1e-8). Metrics from it mean nothing.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None                                    # keep the random initialisation

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        empty = os.path.join(tmp, "empty.pth")
        torch.save({}, empty)
        model = _Unloaded("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                              # running stats = this batch's stats
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randint(0, 256, (calibration_images, 3, calibration_size, calibration_size),
                          dtype=torch.uint8, generator=generator)
    model.train()
    with torch.no_grad():
        model(noise)
    model.eval()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, path)
    return path


def load_extractor(weights_path, device):
    """InceptionV3Features from --inception-weights, unpickled safely: torch-fidelity loads
    the file with weights_only=False (a pickle can run code), so we load it with
    weights_only=True and hand torch-fidelity a plain copy."""
    if weights_path is None or not os.path.isfile(weights_path):
        return InceptionV3Features(weights_path, device)
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the unpickler: one message
        raise JobError(f"--inception-weights {weights_path} is not a plain weights file "
                              f"({one_line(e)}): pass torch-fidelity's weights-inception-2015-12-05"
                              f" .pth (a state_dict of tensors)") from e
    fd, plain = tempfile.mkstemp(prefix="inception-", suffix=".pth")
    os.close(fd)
    try:
        torch.save(state, plain)
        return InceptionV3Features(plain, device)
    finally:
        os.remove(plain)


def compute_activations(batches, extractor, total=None, desc="activations"):
    """Run `extractor` over an iterable of uint8 (B, H, W, 3) batches; concatenated outputs."""
    from tqdm.auto import tqdm
    out = {}
    for batch in tqdm(batches, total=total, desc=desc, file=sys.stderr, disable=None):
        for key, value in extractor(batch).items():
            out.setdefault(key, []).append(value)
    if not out:
        raise JobError("no images to compute activations of")
    return {key: np.concatenate(value, axis=0) for key, value in out.items()}
