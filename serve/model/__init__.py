"""Model artefacts the project builds itself (no hub download is possible offline)."""
