"""Transports move messages and host WorkerCores; they compute nothing."""
