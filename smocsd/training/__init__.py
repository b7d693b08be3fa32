"""Training, what runs in the child process of a cycle: the TrainingJob contract and
its hooks, the built-in autoencoder job, screening, the threshold, the trainers (the
backends) and the result a cycle comes to. Imports common, data, and the models and
scoring (smocsd.store, smocsd.scoring, smocsd.report, smocsd.modelfile).
"""
