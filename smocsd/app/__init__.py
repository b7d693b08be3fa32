"""The service: the command line, the daemon and its loop, the training cycle (the
child's supervision, the recording of its result), live scoring, metrics and systemd.
The top: it may import every other part, and no part imports it.
"""
