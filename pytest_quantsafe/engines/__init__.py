"""Inference engines, one module each; ``base`` holds the protocol and the registry."""
