"""Connectors from vision features to LLM embeddings. Importing registers identity, linear, mlpNx_gelu."""

from mmkit.connectors.mlp import Connector, IdentityConnector, LinearConnector, MLPConnector  # noqa: F401

__all__ = ["Connector", "IdentityConnector", "LinearConnector", "MLPConnector"]
