"""Pure logic: messages, their codec, the caller's graph and the worker state machine."""
