"""Delivery: the durable SQLite outbox and the publishers that empty it to Kafka or
MQTT. Imports only smocsd.common.
"""
