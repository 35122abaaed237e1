"""groundset: LAION URL lists -> filtered, grounded text-to-image training data."""

__version__ = "0.1.0"
