"""`kvtier bench chat`'s plan: returning users come back oldest first, and by the time they
return, more contexts than vLLM's (small) cache holds have been served since their last turn,
so their context comes from kvtier, not from vLLM's own cache (the fair baseline recomputes
it). With too few users met before, the same check finds returns vLLM's cache still holds."""

from __future__ import annotations

import pytest

from kvtier.bench.chat import SMALL_VLLM_CACHE_BLOCKS, bursts, isolated_users, users_met


def _closest_return(plan: list[list[int]], met: int) -> int:
    """The fewest contexts served between two turns of one user, over the whole plan."""
    last: dict[int, int] = {user: 0 for user in range(met)}  # all met at once, first
    served, closest = met, 1 << 30
    for users in plan:
        for user in users[1:]:  # the returning ones
            closest = min(closest, served - last[user])
        served += len(users)
        for user in users:
            last[user] = served
    return closest


@pytest.mark.parametrize(("size", "history", "engines"), [(4, 2000, 1), (3, 1500, 1), (4, 2000, 2)])
def test_returning_users_come_back_after_more_contexts_than_vllms_cache_holds(
    size: int, history: int, engines: int
) -> None:
    held = engines * SMALL_VLLM_CACHE_BLOCKS * 128 / history  # contexts vLLM's caches hold
    met = users_met(size, history, engines)
    plan, oldest_first = bursts(8, size, met)
    assert [len(users) for users in plan] == [size] * 8
    assert [users[0] for users in plan] == list(range(met, met + 8))  # one new user each
    assert _closest_return(plan, met) >= held
    # Each user's turns are spread evenly: none returns twice while another waits.
    counts = [sum(user in users[1:] for users in plan) for user in range(met)]
    assert max(counts) - min(counts) <= 1
    assert sorted(oldest_first) == list(range(met + 8))
    # Too few met: a return comes while vLLM's cache still holds the context.
    small_plan, _ = bursts(8, size, size - 1)
    assert _closest_return(small_plan, size - 1) < held


def test_the_plan_refuses_too_few_users_to_fill_a_burst() -> None:
    with pytest.raises(ValueError, match="cannot fill bursts of 4"):
        bursts(2, 4, 2)


def test_isolated_hits_are_second_turns_like_the_returning_ones() -> None:
    plan, oldest_first = bursts(4, 4, 12)
    assert isolated_users(oldest_first, plan, 2) == [12, 13]  # the oldest bursts' new users
    assert isolated_users(oldest_first, plan, 6) == [12, 13, 14, 15, 0, 1]
    plan, oldest_first = bursts(8, 4, 9)  # the serve run's plan: new users come back too
    back = {u for users in plan for u in users[1:]}
    chosen = isolated_users(oldest_first, plan, 3)
    assert not set(chosen) & back and all(u >= 9 for u in chosen), chosen
