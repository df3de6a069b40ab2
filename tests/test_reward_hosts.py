"""Reward hosts (rewards.cluster_pool) on real Ray: results in order, the hard per-call timeout of the
host's own pool, a host killed mid-call costing only its chunk's calls, and a RewardSet scoring through
them. (On two nodes: tests/test_multinode.py.)"""

import threading
import time

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hosts(ray_local):
    from rewards.cluster_pool import ClusterRewardPool

    with ClusterRewardPool(hosts=2, workers_per_host=1, timeout_s=2.0, preload=("rewards.math",)) as pool:
        yield pool


def test_results_come_back_in_order_from_both_hosts(hosts):
    from rewards.math import math_reward

    answers = [str(i % 7) for i in range(10)]
    results = [o.value for o in hosts.run(math_reward, [(f"\\boxed{{{i % 5}}}", a) for i, a in enumerate(answers)])]
    assert [r.correct for r in results] == [str(i % 5) == a for i, a in enumerate(answers)]
    assert len(set(hosts.nodes())) == 1  # one node here; two in tests/test_multinode.py


def test_a_call_past_its_limit_is_killed_and_the_rest_finish(hosts):
    start = time.monotonic()
    outcomes = hosts.run(time.sleep, [(0.1,), (60,), (0.1,), (0.1,)])
    assert time.monotonic() - start < 30
    assert [o.timed_out for o in outcomes] == [False, True, False, False]
    assert outcomes[1].error == "timeout after 2s"


def test_a_host_killed_mid_call_fails_its_chunk_only_and_is_replaced(hosts):
    import ray

    victims = list(hosts._hosts)
    threading.Timer(3.0, lambda: ray.kill(victims[0])).start()
    outcomes = hosts.run(time.sleep, [(1.5,)] * 8)  # ~6 s of calls: the kill lands mid-chunk
    died = [o for o in outcomes if o.error == "error: reward host died"]
    assert died and len(died) < 8 and all(o.ok for o in outcomes if o not in died)
    assert hosts.host_restarts == 1 and hosts._hosts[0] is not victims[0]
    assert all(o.ok for o in hosts.run(time.sleep, [(0.1,)] * 4))  # the replacement serves


def test_a_reward_set_scores_through_the_hosts(hosts):
    from rewards.combine import RewardSet
    from rewards.types import RewardInput

    with RewardSet(["math", {"name": "length", "weight": 0.5}], pool=hosts) as rs:
        groups = rs.score_groups([[RewardInput("1+1?", "<think>1+1=2</think>\\boxed{2}", "2", num_tokens=8),
                                   RewardInput("1+1?", "<think>so 1+1 is 3</think>\\boxed{3}", "2", num_tokens=12)]], 1)
    assert [[s.total for s in g] for g in groups] == [[1.25, -0.25]]
