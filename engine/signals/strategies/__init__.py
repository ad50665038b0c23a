"""The strategies shipped with the platform: SMA crossover and Wilder's RSI."""
