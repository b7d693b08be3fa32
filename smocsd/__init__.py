"""smocsd: trains anomaly-detection autoencoders on edge gateways."""

__version__ = "0.1.0"

from .job import Saved, TrainingJob

__all__ = ["Saved", "TrainingJob", "__version__"]
