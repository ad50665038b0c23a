"""The replicator: master events in, follower orders and copy decisions out."""
