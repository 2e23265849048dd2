"""TriHRGE networks (filled in by the model issue)."""
