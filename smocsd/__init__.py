"""smocsd: trains anomaly-detection autoencoders on edge gateways.

The folders are the parts, bottom to top; an import never runs back up
(tests/test_structure.py checks it):

- common/    what every part uses: config, files (locks, durable writes), records,
             state.json, labels.json, a version's metadata.json (modelmeta); and
             schemas/, the messages' schema names, which stays where the contract
             documents it
- data/      data in: the readings sources, the windows and their normalization, demo
- delivery/  the durable outbox and the Kafka/MQTT publishers
- here       the models and scoring, at the paths a user's job imports: store, scoring,
             report, and modelfile (a version's files)
- training/  what runs in the cycle's child: the TrainingJob contract (job), its hooks,
             the result a cycle comes to, the built-in autoencoder, screen, threshold,
             trainers/
- app/       the service: cli, daemon, the cycle (its child's supervision, the
             recording of its result), live scoring, metrics, systemd
"""

__version__ = "0.5.0"

from .training.job import Saved, TrainingJob

__all__ = ["Saved", "TrainingJob", "__version__"]
