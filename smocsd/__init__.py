"""smocsd: trains anomaly-detection autoencoders on edge gateways."""

__version__ = "0.1.0"

from .job import TrainingJob

__all__ = ["TrainingJob", "__version__"]
