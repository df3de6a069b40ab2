"""Pure logic of the rollout layer (the engine itself is exercised in test_install.py and test_e2e.py)."""

from rollout.engine import bound_cores, cpu_binding


def test_cpu_binding_gives_each_engine_its_own_cores():
    assert [cpu_binding(e, 2, [0, 1]) for e in range(2)] == ["0", "1"]
    assert [cpu_binding(e, 2, list(range(8))) for e in range(2)] == ["0,1,2,3", "4,5,6,7"]
    # one core list per tensor-parallel rank, "|"-separated as vLLM reads them
    assert [cpu_binding(e, 2, list(range(8)), tensor_parallel_size=2) for e in range(2)] == ["0,1|2,3", "4,5|6,7"]
    assert cpu_binding(1, 3, [4, 5, 6, 7, 8]) == "5,6"  # the cores this process may use, not 0..n-1
    # more engines than cores: cores are shared round-robin rather than refused
    assert [cpu_binding(e, 3, [0, 1]) for e in range(3)] == ["0", "1", "0"]


def test_bound_cores_reads_one_ranks_core_list_and_nothing_else():
    assert bound_cores("1") == [1] and bound_cores("2,3") == [2, 3] and bound_cores("0-3,6") == [0, 1, 2, 3, 6]
    # vLLM's own words and tensor-parallel lists (one per rank) leave the engine as vLLM runs it
    for other in ("auto", "nobind", "all", "0,1|2,3", "", "0-", "a,b"):
        assert bound_cores(other) == [], other
    assert [bound_cores(cpu_binding(e, 2, list(range(8)))) for e in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
