"""Pure logic of placement and of the weight sync's containers: which requests a cluster can hold (and the
message when it cannot), weight buckets through their byte form, and the engine's shared-memory arena."""

import mmap

import pytest
import torch

from thinkrl.cluster import ClusterTooSmall, Resources, check_fits

NODES = {"10.0.0.1": {"CPU": 8.0, "GPU": 2.0, "rollout_node": 2.0},
         "10.0.0.2": {"CPU": 8.0, "GPU": 4.0, "trainer_node": 4.0}}


def test_requests_that_fit_pass():
    check_fits("trainers", 4, Resources(cpus=2, gpus=1, custom={"trainer_node": 1}), NODES)
    check_fits("engines", 2, Resources(cpus=4, gpus=1), NODES)
    check_fits("nothing reserved", 100, Resources(), NODES)  # the CPU default: no reservation at all


def test_a_resource_the_cluster_lacks_is_named_with_the_role():
    with pytest.raises(ClusterTooSmall) as e:
        check_fits("rl trainer ranks (rl.num_trainers x ...)", 5, Resources(gpus=1, custom={"trainer_node": 1}), NODES)
    msg = str(e.value)
    assert msg.startswith("rl trainer ranks (rl.num_trainers x ...): 5 x {GPU: 1, trainer_node: 1}")
    assert "trainer_node: 5 asked, 4 in the cluster" in msg and "GPU: 5 asked" not in msg  # 6 GPUs are there
    assert "10.0.0.1: {CPU: 8, GPU: 2, rollout_node: 2}" in msg  # what each node has


def test_totals_that_suffice_but_fit_on_no_node_are_refused():
    # 12 CPUs in all, but no node has 6 twice over: the second bundle fits nowhere
    with pytest.raises(ClusterTooSmall, match=r"no node has room for one more \(placed 2\)"):
        check_fits("engines", 3, Resources(cpus=5), NODES)
    with pytest.raises(ClusterTooSmall, match="all of them"):
        check_fits("trainers", 2, Resources(gpus=3), NODES, strict_pack=True)
    check_fits("trainers", 2, Resources(gpus=2), NODES, strict_pack=True)  # both on the 4-GPU node


def test_weight_buckets_round_trip_through_bytes_in_every_dtype():
    from thinkrl.train_engine import WeightBucket

    state = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(6).view(2, 3),
             "d": torch.randn(4, 4)[:, 1]}  # a strided view travels as its values
    bucket = WeightBucket.pack(state)
    assert bucket.nbytes == 15 * 4 + 7 * 2 + 6 * 8 + 4 * 4
    out = dict(bucket.tensors())
    assert list(out) == list(state)
    for name, tensor in state.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)


def test_the_arena_hands_tensors_to_another_reader_and_grows():
    from thinkrl.arena import WeightArena

    def read(arena, tensors, layout):  # what a vLLM worker does: open the writer's fd by its /proc path
        with open(arena.path, "rb") as f:
            view = mmap.mmap(f.fileno(), arena.size, prot=mmap.PROT_READ)
        raw = bytes(view)
        view.close()
        for (name, tensor), (lname, dtype, shape, offset) in zip(tensors, layout, strict=True):
            n = tensor.numel() * tensor.element_size()
            got = torch.frombuffer(bytearray(raw[offset : offset + n]), dtype=getattr(torch, dtype)).view(shape)
            assert lname == name and torch.equal(got, tensor)

    arena = WeightArena()
    try:
        first = [("x", torch.randn(10, 3)), ("y", torch.randn(5).to(torch.bfloat16))]
        layout = arena.stage(first)
        assert all(offset % 64 == 0 for *_, offset in layout)
        read(arena, first, layout)
        size, path = arena.size, arena.path
        # the next bucket of a sync goes after the first, and the arena grows in place, keeping it
        second = [("z", torch.randn(100, 100)), ("w", torch.arange(7).view(7, 1))]
        layout += arena.stage(second, arena.end)
        assert arena.size > size and arena.path == path and layout[2][3] >= layout[1][3] + 5 * 2
        read(arena, first + second, layout)
        # a later sync writes over the same bytes: nothing is allocated again
        again = [(name, torch.zeros_like(t)) for name, t in first + second]
        grown = arena.size
        assert arena.stage(again) == layout and arena.size == grown
        read(arena, again, layout)
    finally:
        arena.close()
