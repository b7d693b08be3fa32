"""smocsd: trains anomaly-detection autoencoders on edge gateways."""

__version__ = "0.1.0"
