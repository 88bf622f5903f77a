"""The container image every component runs in: the suite's own (see Dockerfile)."""

import os

IMAGE = os.environ.get("DISTILLERY_IMAGE", "ghcr.io/distillery/distillery:0.1.0")
"""Override with $DISTILLERY_IMAGE at compile time to point at your registry's build."""
