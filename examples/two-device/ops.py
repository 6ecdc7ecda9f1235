"""Operations of the two-device flow: a sensor role produces readings, an aggregator sums them."""


def sample(count: int) -> dict[str, list[int]]:
    """Produce `count` deterministic readings (the sensor device)."""
    return {"readings": [(i * 7) % 10 for i in range(count)]}


def summarise(readings: list[int]) -> dict[str, int]:
    """Sum the readings received from the sensor (the aggregator device)."""
    return {"total": sum(readings)}
