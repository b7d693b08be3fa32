"""Data in: the readings source (SQLite or PostgreSQL), the windows cut from the
readings and their normalization, and the demo plant. Imports only smocsd.common.
"""
