"""What every layer may use: user errors, atomic file writes, cache folders, malloc settings."""
