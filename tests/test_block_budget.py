"""BlockBudget: block mode's one rule for how many key blocks each KV head keeps in a query block."""

import pytest
import torch

from kernels import reference as ref
from kernels.block_budget import BlockBudget
from sea_convert.attention.select import block_budget
from sea_convert.recipe import SEAConfig

BUDGETS = [
    BlockBudget(per_head=4, sink_blocks=1, local_blocks=1),
    BlockBudget(per_head=1, sink_blocks=0, local_blocks=0),
    BlockBudget(per_head=2, sink_blocks=3, local_blocks=2),
    # densities whose fp32 products land on whole numbers where fp64's do not (and back)
    *(BlockBudget(density=d, sink_blocks=1, local_blocks=1) for d in (0.1, 0.25, 0.3, 1 / 3, 0.7, 1.0)),
    BlockBudget(density=0.05, sink_blocks=0, local_blocks=2),
]


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_host_numbers_equal_the_tensor_rule(budget):
    i = torch.arange(5000)
    assert [budget.blocks(int(x)) for x in i] == budget.blocks_tensor(i).tolist()
    assert budget.bound(5000) == max(budget.blocks(x) for x in range(5000))
    assert budget.bound(1) == 1  # the first query block has one causal block


@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_never_below_the_forced_blocks_nor_above_the_causal_ones(budget):
    for i in range(300):
        forced = len({j for j in range(i + 1) if j < budget.sink_blocks or j > i - budget.local_blocks})
        assert forced <= budget.blocks(i) <= i + 1


@pytest.mark.parametrize("budget", BUDGETS[:4] + BUDGETS[-1:], ids=str)
def test_select_key_blocks_keeps_the_budget(budget):
    """With every causal block a candidate, query block i keeps exactly blocks(i) per KV head (grouped)."""
    Hkv, nb = 3, 41
    g = torch.Generator().manual_seed(nb)
    scores = torch.rand(2, Hkv, nb, nb, generator=g).masked_fill(torch.ones(nb, nb, dtype=torch.bool).triu(1), float("-inf"))
    _, count = ref.select_key_blocks(scores, budget)
    assert count.sum(1).tolist() == [[budget.blocks(i) * Hkv for i in range(nb)]] * 2


def test_from_settings_rounds_keys_up_to_whole_blocks():
    assert block_budget(SEAConfig(k=16, predictor_length=32, block_size=16, block_keys=48)) == BlockBudget(
        per_head=3, sink_blocks=1, local_blocks=1)
    assert block_budget(SEAConfig(k=16, predictor_length=32, block_size=16, block_keys=50)).per_head == 4
    assert block_budget(SEAConfig(k=20, predictor_length=32, block_size=16)).per_head == 2  # default: k keys
    assert block_budget(SEAConfig(k=16, predictor_length=32, block_size=16, block_density=0.25, sink_blocks=2)) == \
        BlockBudget(density=0.25, sink_blocks=2, local_blocks=1)


def test_one_of_per_head_and_density():
    with pytest.raises(ValueError, match="one of per_head, density"):
        BlockBudget(per_head=2, density=0.5, sink_blocks=1, local_blocks=1)
    with pytest.raises(ValueError, match="one of per_head, density"):
        BlockBudget(sink_blocks=1, local_blocks=1)
