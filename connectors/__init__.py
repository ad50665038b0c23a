"""Terminal connectors: paper venue, bridge EA over ZeroMQ, MetaTrader5 package."""
