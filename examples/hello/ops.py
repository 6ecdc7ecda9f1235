"""Operations of the hello flow: one operation whose result is checkable ("hello, world")."""


def hello(name: str) -> dict[str, str]:
    """Greet `name`; the agent reports {"greeting": "hello, world"} for the seeded name."""
    return {"greeting": f"hello, {name}"}
