"""Experiments built from the library: significance runs over seeds and the demo."""
