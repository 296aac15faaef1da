"""Sample quality on the built-in digits, judged by a model that knows nothing of diffusion.

A small MLP classifier (scikit-learn) is trained on the real training split only. It labels
the generated images (class accuracy: does the sample show the digit it was asked for?), and
its hidden layer is the feature space for a Fréchet distance between generated and real
held-out images. The same distance between two real splits is the floor a perfect generator
would reach with that many images, so the two numbers are read side by side.
"""
import numpy as np
import torch

from helpers.evaluation.metrics import compute_statistics, frechet_distance


def _flatten(images):
    """(N, C, H, W) tensor/array in [-1, 1] -> (N, C*H*W) float64 array."""
    if torch.is_tensor(images):
        images = images.detach().float().cpu().numpy()
    return np.asarray(images, dtype=np.float64).reshape(len(images), -1)


def train_classifier(images, labels, hidden=128, seed=0):
    """Fit the judge on real training images; returns a fitted sklearn MLPClassifier."""
    from sklearn.neural_network import MLPClassifier
    classifier = MLPClassifier(hidden_layer_sizes=(hidden,), alpha=1e-3, max_iter=500,
                               random_state=seed)
    classifier.fit(_flatten(images), np.asarray(labels))
    return classifier


def classifier_features(classifier, images):
    """Hidden-layer (ReLU) activations of the judge: its learnt view of a digit."""
    hidden = _flatten(images) @ classifier.coefs_[0] + classifier.intercepts_[0]
    return np.maximum(hidden, 0.0)


def accuracy(classifier, images, labels):
    """Share of images that the judge assigns to the given labels."""
    return float(np.mean(classifier.predict(_flatten(images)) == np.asarray(labels)))


def feature_frechet(classifier, images_a, images_b):
    """Fréchet distance between two image sets in the judge's feature space."""
    mu_a, sigma_a = compute_statistics(classifier_features(classifier, images_a))
    mu_b, sigma_b = compute_statistics(classifier_features(classifier, images_b))
    return float(frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def evaluate_samples(samples, sample_labels, train_images, train_labels, test_images, test_labels,
                     seed=0, classifier=None):
    """All quick-start figures in one dict.

    The floor compares a random subset of real training images, as many as there are
    samples, with the held-out images, so both distances carry the same small-sample bias.
    `classifier`: the judge train_classifier(train_images, train_labels, seed=seed) already fitted
    (a sweep judging many sample sets fits it once; the fit is deterministic, so the figures are the same).
    """
    if classifier is None:
        classifier = train_classifier(train_images, train_labels, seed=seed)
    rng = np.random.default_rng(seed)
    count = min(len(samples), len(train_images))
    subset = rng.choice(len(train_images), size=count, replace=False)
    return {
        "classifier_test_accuracy": accuracy(classifier, test_images, test_labels),
        "sample_accuracy": accuracy(classifier, samples, sample_labels),
        "frechet_samples_vs_test": feature_frechet(classifier, samples, test_images),
        "frechet_train_vs_test": feature_frechet(classifier, _flatten(train_images)[subset],
                                                 test_images),
        "num_samples": int(len(samples)),
    }
