"""tradecopy services: replicator, CLI and runtime."""
