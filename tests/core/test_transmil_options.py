"""TransMIL's options: the Nyström output slicing (nystrom-attention 0.0.9's first rows or the later
versions' last rows), smaller sizes for CPU training, and the shortcuts that must not change
what the model computes (layer 2 computed for the class token's slot only, recomputed attention
for long bags). The slicings themselves are checked against a reference in test_interop.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model, parameter_counts


@pytest.mark.parametrize("output_slice", ["first", "last"])
def test_second_layer_for_the_class_token_only_equals_the_full_layer(output_slice):
    """Layer 2 computes the class token's slot alone; the full layer gives the same slot and row."""
    torch.manual_seed(0)
    model = create_model("transmil", 8, dim=32, heads=4, landmarks=8, dropout=0.0, output_slice=output_slice).eval()
    tokens = torch.randn(1, 1 + 7 * 7, 32)
    with torch.no_grad():
        full, row_full = model.layer2(tokens)
        slot, row = model.layer2(tokens, keep=1)
    assert full.shape == (1, 50, 32) and slot.shape == (1, 1, 32)
    torch.testing.assert_close(slot, full[:, :1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(row, row_full, atol=1e-6, rtol=1e-4)


def test_the_slicing_is_an_option_of_the_configuration():
    torch.manual_seed(0)
    last = create_model("transmil", 8, dim=32, heads=4, landmarks=8, dropout=0.0).eval()
    first = create_model("transmil", 8, dim=32, heads=4, landmarks=8, dropout=0.0, output_slice="first").eval()
    first.load_state_dict(last.state_dict())
    assert last.output_slice == last.layer1.attn.output_slice == "last"
    assert first.layer1.attn.output_slice == first.layer2.attn.output_slice == "first"
    x = torch.randn(1, 40, 8)  # 1 + 49 tokens: 6 rows of front padding
    with torch.no_grad():
        a, b = last(x), first(x)
    assert (a.logits - b.logits).abs().max() > 1e-4
    for out in (a, b):
        assert out.attention.shape == (1, 40) and torch.allclose(out.attention.sum(1), torch.ones(1))
        assert (out.attention >= 0).all()
    with pytest.raises(NapariMilError, match="output_slice"):
        create_model("transmil", 8, output_slice="middle")


def test_padded_bags_with_the_first_rows_slicing():
    """A padded batch gives each bag what it gives alone (bags run one by one), in either slicing."""
    torch.manual_seed(0)
    model = create_model("transmil", 8, dim=32, heads=4, landmarks=8, output_slice="first").eval()
    x = torch.randn(2, 30, 8)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 20:] = False
    with torch.no_grad():
        batch = model(x, mask)
        alone = model(x[1:, :20])
    torch.testing.assert_close(batch.logits[1], alone.logits[0])
    torch.testing.assert_close(batch.attention[1, :20], alone.attention[0])
    assert (batch.attention[1, 20:] == 0).all()


def test_a_small_size_for_the_cpu_trains():
    """dim 128, 4 heads, 64 landmarks: about 1/10 of the default's parameters, and a 600-instance
    bag trains (the Nyström pseudo-inverse is 64 x 64 instead of 256 x 256)."""
    torch.manual_seed(0)
    small = create_model("transmil", 38, dim=128, heads=4, landmarks=64)
    default = create_model("transmil", 38)
    assert small.layer1.attn.dim_head == 32 and small.layer1.attn.landmarks == 64
    assert parameter_counts(small)[0] * 10 < parameter_counts(default)[0]
    opt = torch.optim.Adam(small.parameters(), 1e-3)
    x, y = torch.randn(1, 600, 38), torch.tensor([1])
    losses = []
    for _ in range(5):
        loss = F.cross_entropy(small(x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    out = small.eval()(x)
    assert out.attention.shape == (1, 600) and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("cfg,message", [({"dim": 100, "heads": 8}, "multiple of the heads"),
                                         ({"landmarks": 0}, "landmarks"), ({"heads": 0}, "heads"),
                                         ({"dim": 64.5}, "dim")])
def test_invalid_sizes_are_refused(cfg, message):
    with pytest.raises(NapariMilError, match=message):
        create_model("transmil", 8, **cfg)


def test_a_width_that_is_not_a_multiple_of_the_heads_is_fine_with_an_explicit_head_size():
    model = create_model("transmil", 8, dim=100, heads=8, dim_head=16, landmarks=16).eval()
    assert model(torch.randn(1, 30, 8)).logits.shape == (1, 2)
