"""MIL models: one contract (logits, embedding, attention), masks, and Extreme ABMIL's frozen V."""

import pytest
import torch

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model, list_models, parameter_counts

MODELS = ["abmil", "abmil_gated", "extreme_abmil", "mean_pool", "max_pool"]


def bags(seed=0, n=7, d=16):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, d, generator=gen)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, 4:] = False  # the second bag has 4 real instances, 3 of padding
    return x, mask


def test_registry_lists_the_models():
    assert set(MODELS) <= set(list_models())
    with pytest.raises(NapariMilError, match="choose one of .*abmil"):
        create_model("transmil2", 16)
    with pytest.raises(NapariMilError, match="abmil"):
        create_model("abmil", 16, hidden_size=3)


@pytest.mark.parametrize("name", MODELS)
def test_contract_shapes_and_attention(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16, n_classes=3).eval()
    x, mask = bags()
    out = model(x, mask)
    assert out.logits.shape == (2, 3) and out.attention.shape == (2, 7) and out.embedding.shape[0] == 2
    torch.testing.assert_close(out.attention.sum(1), torch.ones(2))
    assert (out.attention[1, 4:] == 0).all() and (out.attention >= 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_does_not_leak(name):
    torch.manual_seed(0)
    model = create_model(name, in_dim=16).eval()
    x, mask = bags()
    noisy = x.clone()
    noisy[1, 4:] = 1e3  # garbage in the padded slots
    a, b = model(x, mask), model(noisy, mask)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.attention, b.attention)
    alone = model(x[1:, :4])  # the same bag without padding
    torch.testing.assert_close(a.logits[1:], alone.logits)


@pytest.mark.parametrize("name", MODELS)
def test_attention_follows_its_instance(name):
    """Permuting the instances permutes the attention the same way; the prediction is unchanged."""
    torch.manual_seed(0)
    model = create_model(name, in_dim=16).eval()
    x, _ = bags()
    perm = torch.randperm(7)
    a, b = model(x[:1]), model(x[:1, perm])
    torch.testing.assert_close(b.attention[0], a.attention[0, perm])
    torch.testing.assert_close(a.logits, b.logits)


def test_attention_points_at_the_key_instance():
    """ABMIL trained on bags whose label is one planted instance attends to that instance."""
    torch.manual_seed(0)
    model = create_model("abmil", in_dim=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for step in range(300):
        x = torch.randn(1, 20, 8, generator=gen)
        label = step % 2
        if label:
            x[0, step % 20, 0] += 6.0
        loss = torch.nn.functional.cross_entropy(model(x).logits, torch.tensor([label]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(1, 20, 8, generator=gen)
    x[0, 13, 0] += 6.0
    out = model.eval()(x)
    assert out.attention[0].argmax().item() == 13 and out.logits.argmax().item() == 1


def test_extreme_abmil_trains_only_w_and_the_classifier():
    deep = create_model("abmil", in_dim=1024, embed_dim=512, attn_dim=128)
    extreme = create_model("extreme_abmil", in_dim=1024, attn_dim=128)
    total, trainable = parameter_counts(extreme)
    assert trainable == (128 + 1) + (1024 + 1) * 2
    assert total == trainable + 1024 * 128 + 128
    assert parameter_counts(deep)[1] / trainable > 5  # the paper's "5x fewer trained parameters"
    frozen = extreme.attn_v.weight.clone()
    opt = torch.optim.SGD([p for p in extreme.parameters() if p.requires_grad], lr=0.1)
    x, _ = bags(d=1024)
    torch.nn.functional.cross_entropy(extreme(x).logits, torch.tensor([0, 1])).backward()
    opt.step()
    torch.testing.assert_close(extreme.attn_v.weight, frozen)
    assert extreme.attn_v.weight.grad is None and extreme.attn_w.weight.grad is not None


def test_extreme_abmil_ridge_fit_separates_bags():
    torch.manual_seed(0)
    model = create_model("extreme_abmil", in_dim=12, attn_dim=32)
    gen = torch.Generator().manual_seed(3)
    train, labels = [], []
    for i in range(40):
        x = torch.randn(15, 12, generator=gen)
        if i % 2:
            x[:, 0] += 1.5  # positive bags are shifted along one feature
        train.append(x)
        labels.append(i % 2)
    model.fit_classifier_ridge(train, torch.tensor(labels))
    with torch.no_grad():
        pred = torch.stack([model(b[None]).logits[0] for b in train]).argmax(1)
    assert (pred == torch.tensor(labels)).float().mean() == 1.0
