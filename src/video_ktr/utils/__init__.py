"""Infrastructure below everything else: option dataclasses and their parsing, JSON lines, background prefetch."""
