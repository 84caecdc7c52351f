"""Data: discovery of layouts and manifests, image reading, preprocessing, synthetic data."""
