"""Quality metrics: FD-<dataset> in a trained classifier's features (offline; images, video and audio, by the
reference's modality), per-frame FD-MNIST and temporal consistency of digit video (not FVD), FID with the
Inception network (local weights), KID, precision and recall; reference statistics cached per data set. This
package's public API, re-exported from its modules."""

from scm.metrics.classifier import get_classifier, train_classifier
from scm.metrics.distances import feature_stats, frechet_distance, kernel_distance, precision_recall
from scm.metrics.frames import mnist_frames, temporal_consistency
from scm.metrics.intervals import SeedInterval, seed_interval
from scm.metrics.quality import FeatureSpace, RefStats, measure, open_reference, reference_stats

__all__ = ["FeatureSpace", "RefStats", "SeedInterval", "feature_stats", "frechet_distance", "get_classifier",
           "kernel_distance", "measure", "mnist_frames", "open_reference", "precision_recall", "reference_stats",
           "seed_interval", "temporal_consistency", "train_classifier"]
