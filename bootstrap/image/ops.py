"""The bootstrap image's only operation: none is ever run (the flow format requires a dataflow)."""


def noop(nothing: str) -> dict[str, str]:
    """Return the input unchanged."""
    return {"done": nothing}
