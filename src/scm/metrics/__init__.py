"""Quality metrics: FD-<dataset> in a trained classifier's features (offline), FID with the Inception network
(local weights), KID, precision and recall; reference statistics cached per data set. This package's public API,
re-exported from its modules."""

from scm.metrics.distances import feature_stats, frechet_distance, kernel_distance, precision_recall
from scm.metrics.intervals import SeedInterval, seed_interval
from scm.metrics.quality import FeatureSpace, RefStats, measure, open_reference

__all__ = ["FeatureSpace", "RefStats", "SeedInterval", "feature_stats", "frechet_distance", "kernel_distance",
           "measure", "open_reference", "precision_recall", "seed_interval"]
