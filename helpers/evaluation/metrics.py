"""ADM's sample-quality metrics (FID, sFID, Inception Score, precision, recall) in PyTorch/NumPy.

The definitions follow OpenAI's guided-diffusion evaluation suite (`evaluations/evaluator.py`,
the numbers DiT and DiC report); TensorFlow is replaced by torch-fidelity's port of the same
2015 InceptionV3 graph. What each piece corresponds to in ADM, and where it differs:

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
- Statistics: mean and `np.cov(rowvar=False)` of the features (ADM's compute_statistics); we
  take the mean in float64 (ADM: float32), a difference at float32 round-off level.
- Fréchet distance: ADM's formula with `scipy.linalg.sqrtm`, its eps=1e-6 diagonal offset when
  the product's square root is not finite, and its check on imaginary parts (diagonal, atol
  1e-3). `method="eigh"` computes the same trace via two symmetric eigendecompositions (exact
  in exact arithmetic, about 6x faster on CPU): an option, not ADM's default.
- Inception Score: ADM's (= improved-GAN's): consecutive splits of `split_size` (5000), the last
  split keeping whatever is left (as ADM's loop does); exp(mean_x KL(p(y|x) || p(y))) per split;
  mean over splits (ADM reports no std). Computed in float64; a zero probability contributes
  0 (0 log 0 = 0) where float32 NumPy would give NaN.
- Precision/recall: ADM's ManifoldEstimator (Kynkäänniemi et al. 2019) with k=3: each point's
  radius is the distance to its k-th nearest neighbour in its own set (the point itself is the
  0-th), a point is "in" the other manifold if it lies within (<=) any radius there; precision =
  fraction of samples inside the reference manifold, recall = fraction of reference images
  inside the sample manifold. Distances come from `torch.cdist` in row/column batches (ADM:
  10000 x 10000). ADM compares squared distances computed in float16 when that does not
  overflow (else float32); we compare Euclidean distances in float32 (or float64): the same
  order, without float16 rounding.
"""
import json
import os
import sys
import tempfile
import warnings
import zipfile

import numpy as np
import torch

from helpers.utils.cli import JobError, one_line
from helpers.utils.files import atomic_write, atomic_write_text

# ADM's constants.
POOL_DIM = 2048                 # pool_3 features
SPATIAL_CHANNELS = 7            # mixed_6/conv:0[..., :7]
SPATIAL_SIDE = 17               # 17 x 17 grid at the mixed_6 stage
SPATIAL_DIM = SPATIAL_CHANNELS * SPATIAL_SIDE * SPATIAL_SIDE  # 2023
NUM_LOGITS = 1008               # the 2015 graph's softmax width
SPATIAL_MODULE = "Mixed_6d.branch1x1"  # torch-fidelity's name of TF's mixed_6/conv unit
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH_SIZE = 10000
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


#################################################################################
#                         Statistics and Fréchet distance                       #
#################################################################################

def compute_statistics(features):
    """ADM's FID statistics of an (N, D) feature array: (mean (D,), covariance (D, D)), float64."""
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] < 2:
        raise JobError(f"statistics need an (N, D) feature array with N >= 2, "
                              f"got shape {features.shape}")
    mu = np.mean(features, axis=0, dtype=np.float64)
    sigma = np.cov(features, rowvar=False)                  # float64, divides by N - 1
    return mu, sigma


class RunningStatistics:
    """compute_statistics over batches without keeping the features (for large reference sets).

    Sums are kept in float64 around a shift (the first batch's mean), which avoids the
    cancellation of the naive sum-of-squares formula.
    """

    def __init__(self):
        self.count = 0
        self.shift = None
        self.sum = None
        self.sum_outer = None

    def update(self, features):
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise JobError(f"expected a non-empty (N, D) batch of features, got {x.shape}")
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.sum = np.zeros_like(self.shift)
            self.sum_outer = np.zeros((x.shape[1], x.shape[1]))
        x = x - self.shift
        self.count += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def finalize(self):
        if self.count < 2:
            raise JobError(f"statistics need at least 2 feature vectors, got {self.count}")
        mean_shifted = self.sum / self.count
        sigma = (self.sum_outer - self.count * np.outer(mean_shifted, mean_shifted)) / (self.count - 1)
        return self.shift + mean_shifted, (sigma + sigma.T) / 2


def _trace_sqrt_product_eigh(sigma1, sigma2):
    """tr sqrt(sigma1 sigma2) for PSD sigma1, sigma2, without a non-symmetric square root.

    With sigma1 = V diag(w) V^T and B = V diag(sqrt w), sigma1 sigma2 has the eigenvalues of the
    PSD matrix B^T sigma2 B, so the trace is the sum of their square roots. Eigenvalues of
    sigma1 below a rank tolerance (tr(sigma1) * D * eps, at least numpy's matrix_rank one) are
    zero in exact arithmetic and are skipped, which makes few-image covariances cheap.
    """
    from scipy import linalg
    tol = max(float(np.trace(sigma1)), 0.0) * len(sigma1) * np.finfo(np.float64).eps
    w, v = linalg.eigh(sigma1, driver="evr", subset_by_value=(tol, np.inf))
    if len(w) == 0:
        return 0.0
    b = v * np.sqrt(w)                                      # (D, rank)
    m = b.T @ sigma2 @ b
    eig = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(eig, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6, method="sqrtm"):
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), as ADM computes it.

    method="sqrtm" (ADM's): scipy.linalg.sqrtm of the product; if that is not finite, retry
    with `eps` on both diagonals (with ADM's warning); a complex result is accepted only when
    the diagonal's imaginary parts are within 1e-3 of 0, then its real part is used.
    method="eigh": the same trace from symmetric eigendecompositions (faster, always real).
    """
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise JobError(f"statistics do not match: mean {mu1.shape} vs {mu2.shape}, "
                              f"covariance {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    elif method == "sqrtm":
        with warnings.catch_warnings():                     # ADM passes disp=False: no message
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal "
                          f"of cov estimates", RuntimeWarning, stacklevel=2)
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        if np.iscomplexobj(covmean):
            if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise JobError(f"Fréchet distance: sqrtm has an imaginary component of "
                                      f"{np.max(np.abs(covmean.imag)):.3g} (covariances too "
                                      f"singular; more images help, or use method 'eigh')")
            covmean = covmean.real
        tr_covmean = float(np.trace(covmean))
    else:
        raise JobError(f"unknown Fréchet distance method {method!r}: use 'sqrtm' or 'eigh'")
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


#################################################################################
#                                Inception Score                                #
#################################################################################

def softmax(logits):
    """Row-wise softmax in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=1, keepdims=True)


def inception_score(scores, split_size=IS_SPLIT_SIZE, kind="logits"):
    """ADM's Inception Score of (N, K) class `scores` ("logits" or "probs"): the mean over
    consecutive splits of `split_size` rows (the last split holds the rest; N < split_size gives
    one split of N) of exp(mean_x KL(p(y|x) || p(y))), p(y) being the split's mean prediction.
    """
    if kind == "logits":
        probs = softmax(scores)
    elif kind == "probs":
        probs = np.asarray(scores, dtype=np.float64)
        if probs.ndim == 2 and (np.any(probs < 0) or not np.allclose(probs.sum(axis=1), 1, atol=1e-4)):
            raise JobError("inception_score(kind='probs') needs rows of probabilities "
                                  "(non-negative, summing to 1)")
    else:
        raise JobError(f"unknown kind {kind!r}: use 'logits' or 'probs'")
    if probs.ndim != 2 or probs.shape[0] < 1:
        raise JobError(f"Inception Score needs an (N, K) array with N >= 1, got {probs.shape}")
    if int(split_size) < 1:
        raise JobError(f"the Inception Score split size must be >= 1, got {split_size}")
    scores_per_split = []
    for start in range(0, len(probs), int(split_size)):
        part = probs[start:start + int(split_size)]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores_per_split.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores_per_split))


#################################################################################
#                         Precision and recall (k-NN manifolds)                 #
#################################################################################

def _as_tensor(features, device, dtype):
    if not torch.is_tensor(features):
        features = torch.from_numpy(np.asarray(features))
    return features.to(device=device, dtype=dtype)


def manifold_radii(features, k=PR_NEIGHBOURS, row_batch_size=PR_BATCH_SIZE,
                   col_batch_size=PR_BATCH_SIZE, device="cpu", dtype=torch.float32):
    """Distance of each row of (N, D) `features` to its k-th nearest neighbour in the same set
    (the point itself counts as the 0-th, as in ADM's partition at index k). Returns (N,) tensor."""
    x = _as_tensor(features, device, dtype)
    n = x.shape[0]
    if x.ndim != 2 or n < k + 1:
        raise JobError(f"precision/recall with k={k} needs at least {k + 1} feature "
                              f"vectors per set, got shape {tuple(x.shape)}")
    radii = torch.empty(n, dtype=dtype, device=device)
    for r0 in range(0, n, row_batch_size):
        rows = x[r0:r0 + row_batch_size]
        dist = torch.cat([torch.cdist(rows, x[c0:c0 + col_batch_size],
                                      compute_mode="use_mm_for_euclid_dist")
                          for c0 in range(0, n, col_batch_size)], dim=1)   # (rows, N)
        radii[r0:r0 + rows.shape[0]] = torch.kthvalue(dist, k + 1, dim=1).values
    return radii


def precision_recall(real_features, fake_features, k=PR_NEIGHBOURS, row_batch_size=PR_BATCH_SIZE,
                     col_batch_size=PR_BATCH_SIZE, device="cpu", dtype=torch.float32):
    """ADM's improved precision and recall: (fraction of fake points within some real point's
    k-NN radius, fraction of real points within some fake point's k-NN radius)."""
    real = _as_tensor(real_features, device, dtype)
    fake = _as_tensor(fake_features, device, dtype)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise JobError(f"precision/recall needs two (N, D) feature arrays of the same D, "
                              f"got {tuple(real.shape)} and {tuple(fake.shape)}")
    kw = dict(k=k, row_batch_size=row_batch_size, col_batch_size=col_batch_size,
              device=device, dtype=dtype)
    real_radii = manifold_radii(real, **kw)
    fake_radii = manifold_radii(fake, **kw)
    real_in = torch.zeros(real.shape[0], dtype=torch.bool, device=device)  # recall
    fake_in = torch.zeros(fake.shape[0], dtype=torch.bool, device=device)  # precision
    for r0 in range(0, real.shape[0], row_batch_size):
        r1 = r0 + row_batch_size
        for c0 in range(0, fake.shape[0], col_batch_size):
            c1 = c0 + col_batch_size
            dist = torch.cdist(real[r0:r1], fake[c0:c1], compute_mode="use_mm_for_euclid_dist")
            real_in[r0:r1] |= (dist <= fake_radii[None, c0:c1]).any(dim=1)
            fake_in[c0:c1] |= (dist <= real_radii[r0:r1, None]).any(dim=0)
    return fake_in.double().mean().item(), real_in.double().mean().item()


#################################################################################
#                              InceptionV3 features                             #
#################################################################################

def _first_line(exc):
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
            raise JobError(f"cannot load InceptionV3 weights from {where} ({_first_line(e)}); "
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


#################################################################################
#                                  .npz batches                                 #
#################################################################################

def _read_npy_header(f):
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    return None


class NpzImages:
    """`arr_0` of an .npz batch (uint8 (N, H, W, 3)), validated from its header and read in
    batches without loading the whole array (ADM's evaluator streams it the same way)."""

    def __init__(self, path, what="batch", min_images=1):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise JobError(f"{what} {self.path} does not exist")
        try:
            with zipfile.ZipFile(self.path) as zf:
                self.keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
                if "arr_0" not in self.keys:
                    raise JobError(f"{what} {self.path} has no arr_0 (keys: "
                                          f"{', '.join(self.keys) or 'none'}): save images with "
                                          f"np.savez(path, images)")
                with zf.open("arr_0.npy") as f:
                    header = _read_npy_header(f)
                    data_bytes = zf.getinfo("arr_0.npy").file_size - f.tell()
        except zipfile.BadZipFile as e:
            raise JobError(f"{what} {self.path} is not an .npz file ({e})") from e
        if header is None:                                  # rare .npy format 3.0: read it whole
            with np.load(self.path) as z:
                arr = z["arr_0"]
            header = (arr.shape, False, arr.dtype)
        self.shape, self.fortran_order, self.dtype = tuple(header[0]), header[1], np.dtype(header[2])
        if self.dtype != np.uint8:
            raise JobError(f"{what} {self.path}: arr_0 has dtype {self.dtype}, expected uint8 "
                                  f"images (N, H, W, 3) in [0, 255]")
        if len(self.shape) != 4 or self.shape[3] != 3:
            hint = " (channels first? save (N, H, W, 3))" if len(self.shape) == 4 and self.shape[1] == 3 else ""
            raise JobError(f"{what} {self.path}: arr_0 has shape {self.shape}, expected "
                                  f"(N, H, W, 3) RGB images{hint}")
        if data_bytes < int(np.prod(self.shape)):
            raise JobError(f"{what} {self.path}: arr_0 is truncated ({data_bytes} bytes of "
                                  f"image data for shape {self.shape}); rewrite the file")
        if self.shape[0] < min_images:
            raise JobError(f"{what} {self.path} holds {self.shape[0]} images; at least "
                                  f"{min_images} are needed")

    def __len__(self):
        return self.shape[0]

    def num_batches(self, batch_size):
        return -(-len(self) // batch_size)

    def batches(self, batch_size):
        """Yield uint8 arrays (<= batch_size, H, W, 3) in order."""
        if self.fortran_order:
            with np.load(self.path) as z:
                arr = z["arr_0"]
            for start in range(0, len(arr), batch_size):
                yield np.ascontiguousarray(arr[start:start + batch_size])
            return
        per_image = int(np.prod(self.shape[1:]))
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open("arr_0.npy") as f:
                _read_npy_header(f)
                for start in range(0, len(self), batch_size):
                    count = min(batch_size, len(self) - start)
                    data = f.read(count * per_image)
                    if len(data) != count * per_image:
                        raise JobError(f"{self.path}: arr_0 ends at image "
                                              f"{start + len(data) // per_image} of {len(self)}")
                    yield np.frombuffer(data, dtype=np.uint8).reshape((count,) + self.shape[1:])
        except (zipfile.BadZipFile, OSError, EOFError) as e:    # e.g. a CRC error mid-file
            raise JobError(f"{self.path}: arr_0 cannot be read ({_first_line(e)})") from e


def read_npz_statistics(path, what="batch"):
    """ADM's precomputed statistics in an .npz: ((mu, sigma), (mu_s, sigma_s)), or None if the
    file has no `mu` (ADM then computes them from arr_0)."""
    with np.load(path) as z:
        if "mu" not in z.files:
            return None
        missing = [k for k in STAT_KEYS if k not in z.files]
        if missing:
            raise JobError(f"{what} {path} has mu but not {', '.join(missing)}: a reference "
                                  f"batch holds all of {', '.join(STAT_KEYS)}")
        stats = {k: z[k] for k in STAT_KEYS}
    for key, dim in (("mu", POOL_DIM), ("mu_s", SPATIAL_DIM)):
        sig = "sigma" + key[2:]
        if stats[key].shape != (dim,) or stats[sig].shape != (dim, dim):
            raise JobError(f"{what} {path}: {key}/{sig} have shapes {stats[key].shape}/"
                                  f"{stats[sig].shape}, expected ({dim},)/({dim}, {dim})")
    return (stats["mu"], stats["sigma"]), (stats["mu_s"], stats["sigma_s"])


#################################################################################
#                                 Atomic writes                                 #
#################################################################################

def save_npz_atomic(path, overwrite=False, **arrays):
    """np.savez (uncompressed, like ADM's batches) to a temp file, then rename; never clobbers."""
    return atomic_write(path, lambda tmp: np.savez(tmp, **arrays), overwrite)


def save_json_atomic(path, obj, overwrite=False):
    """JSON (indent 2) written atomically; never clobbers unless `overwrite`."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite)
