"""The on-disk format shared by recorder and analyzer (versioned; see FORMAT.md)."""
