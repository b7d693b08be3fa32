"""What every part uses, at the bottom: the configuration, durable files and locks, the
checked JSON records (state.json, labels.json, a version's metadata.json). It imports
no other part of smocsd (smocsd.schemas, the message schemas' names, belongs here too).
"""
