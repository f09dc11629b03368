"""ttaserve."""
