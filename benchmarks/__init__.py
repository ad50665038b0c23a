"""Latency and throughput harnesses, each printing percentiles next to the raw NATS floor."""
