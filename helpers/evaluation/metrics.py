"""ADM's sample-quality metrics (FID, sFID, Inception Score, precision, recall) in PyTorch/NumPy.

The definitions follow OpenAI's guided-diffusion evaluation suite (`evaluations/evaluator.py`,
the numbers DiT and DiC report); TensorFlow is replaced by torch-fidelity's port of the same
2015 InceptionV3 graph. What each piece corresponds to in ADM, and where it differs:

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

The Inception features these are computed from: helpers/evaluation/inception.py; the .npz batch
and statistics files: helpers/evaluation/npz_files.py.
"""
import warnings

import numpy as np
import torch

from helpers.utils.cli import JobError

# ADM's constants.
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH_SIZE = 10000


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
    """Features (array or tensor) as a tensor on the device and dtype the distances use."""
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
