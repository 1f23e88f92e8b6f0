"""Finding the newest checkpoint that verifies and loading it (``resume``), the daemon's memory tier
first (``memory``).
"""
