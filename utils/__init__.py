"""TriHRGE library: everything the five stage scripts call into."""
