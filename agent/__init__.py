"""edge-agent: an edge learning agent for factory boxes."""

__version__ = "0.1.0"
