"""The bridge: MetaTrader terminals (bridge EA) and the paper terminal over ZeroMQ."""
