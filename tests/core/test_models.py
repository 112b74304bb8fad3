"""MIL models: one contract (logits, embedding, attention), masks, and Extreme ABMIL's frozen V."""

import math

import pytest
import torch
import torch.nn.functional as F

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model, list_models, parameter_counts

MODELS = ["abmil", "abmil_gated", "extreme_abmil", "mean_pool", "max_pool", "transmil"]


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


@pytest.mark.parametrize("name", [m for m in MODELS if m != "transmil"])  # TransMIL is positional
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


# ---- TransMIL ---------------------------------------------------------------------------
def _transmil_tokens(model, x):
    """The tokens entering TransMIL's first layer, rebuilt from its weights: (1, 1 + side^2, dim)."""
    import math

    h = model.fc1(x)
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    h = torch.cat([h, h[:, : side * side - n]], 1)
    return torch.cat([model.cls_token, h], 1), n, side * side - n


def test_transmil_attention_of_instance_i_is_instance_i_exact_case():
    """With as many landmarks as tokens and no padding, Nyström attention is exact softmax
    attention: the model's per-instance attention must equal the class-token row computed
    directly, instance by instance (appended copies folded back)."""
    torch.manual_seed(0)
    n = 15  # 16 tokens after squaring, 17 with the class token
    model = create_model("transmil", in_dim=16, dim=32, heads=2, landmarks=17, attention_layer=0).eval()
    model.layer1.attn.pinv_iterations = 30  # converge the pseudo-inverse: S pinv(S) S = S exactly
    x = torch.randn(1, n, 16)
    with torch.no_grad():
        out = model(x)
        tokens, _, extra = _transmil_tokens(model, x)
        attn = model.layer1.attn
        q, k, _ = attn.to_qkv(model.layer1.norm(tokens)).chunk(3, -1)
        q = q.view(1, 17, 2, 16).transpose(1, 2) * attn.scale
        k = k.view(1, 17, 2, 16).transpose(1, 2)
        exact = torch.softmax(q @ k.transpose(-1, -2), -1)[:, :, 0].mean(1)[0]  # (17,) class-token row, head mean
    expected = exact[1 : n + 1].clone()
    expected[:extra] += exact[n + 1 :]
    expected = expected / expected.sum()
    torch.testing.assert_close(out.attention[0], expected, atol=1e-4, rtol=0)
    assert (out.attention[0] - expected.roll(1)).abs().max() > 1e-2  # an off-by-one would show


def _exact_class_rows(model, x):
    """Each layer's class-token attention row (H, T), computed as exact softmax attention from the
    tokens entering that layer (exact when the landmarks are as many as the tokens)."""
    tokens, _, _ = _transmil_tokens(model, x)
    side = int(math.isqrt(tokens.shape[1] - 1))
    rows = []
    for layer in (model.layer1, model.layer2):
        attn, t = layer.attn, tokens.shape[1]
        q, k, _ = attn.to_qkv(layer.norm(tokens)).chunk(3, -1)
        q = q.view(1, t, attn.heads, attn.dim_head).transpose(1, 2) * attn.scale
        k = k.view(1, t, attn.heads, attn.dim_head).transpose(1, 2)
        rows.append(torch.softmax(q @ k.transpose(-1, -2), -1)[0, :, 0])  # (H, T)
        if layer is model.layer1:
            tokens = model.pos_layer(layer(tokens)[0], side)
    return rows


def _fold(row, n, extra):
    """A class-token row over 1 + side^2 tokens -> the instances' share (N,), copies folded back."""
    att = row[1 : n + 1].clone()
    att[:extra] += row[n + 1 :]
    return att / att.sum()


def test_transmil_attention_is_chosen_per_call_and_leaves_the_model_untouched():
    """model(x, attention_layer=l, attention_head=h) is layer l's class-token row of head h (or
    the mean over heads, or of both layers for l = -1), computed exactly; the model given another
    choice is unchanged afterwards: same weights, same mode, same default output."""
    torch.manual_seed(2)
    n = 15  # 16 tokens after squaring, 17 with the class token: 17 landmarks make Nystrom attention exact
    model = create_model("transmil", in_dim=16, dim=32, heads=2, landmarks=17, dropout=0.0).eval()
    model.layer1.attn.pinv_iterations = model.layer2.attn.pinv_iterations = 30
    x = torch.randn(1, n, 16)
    with torch.no_grad():
        rows = _exact_class_rows(model, x)
        before_state = {k: v.clone() for k, v in model.state_dict().items()}
        before = model(x)
        got = {(layer, head): model(x, attention_layer=layer, attention_head=head).attention[0]
               for layer in (0, 1, -1) for head in (None, 0, 1)}
        after = model(x)
    extra = 16 - n
    for (layer, head), attention in got.items():
        per_layer = [r.mean(0) if head is None else r[head] for r in rows]
        row = per_layer[layer] if layer >= 0 else (per_layer[0] + per_layer[1]) / 2
        torch.testing.assert_close(attention, _fold(row, n, extra), atol=1e-4, rtol=0, msg=f"{layer}, {head}")
    assert (got[0, None] - got[1, None]).abs().max() > 1e-2  # the layers differ
    assert (got[1, 0] - got[1, None]).abs().max() > 1e-2  # a head differs from the mean over heads
    torch.testing.assert_close(got[1, None], before.attention[0], atol=0, rtol=0)  # the default: layer 2, mean
    # nothing leaked into the model
    assert not model.training
    for name, value in model.state_dict().items():
        assert torch.equal(value, before_state[name]), name
    for field in ("logits", "embedding", "attention"):
        assert torch.equal(getattr(after, field), getattr(before, field)), field
    model.train()
    model(x, attention_layer=0, attention_head=1)
    assert model.training
    # the construction's choice is the default of a call that names none; a call's choice wins
    chosen = create_model("transmil", in_dim=16, dim=32, heads=2, landmarks=17, dropout=0.0, attention_layer=0,
                          attention_head=1).eval()
    chosen.load_state_dict(model.state_dict())
    chosen.layer1.attn.pinv_iterations = chosen.layer2.attn.pinv_iterations = 30
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(chosen(x).attention[0], got[0, 1], atol=0, rtol=0)
        torch.testing.assert_close(chosen(x, attention_layer=1).attention[0], got[1, 1], atol=0, rtol=0)
    assert (chosen.default_attention_layer, chosen.default_attention_head) == (0, 1)
    for bad in ({"attention_layer": 2}, {"attention_head": 2}, {"attention_head": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            model(x, **bad)
    with pytest.raises(NapariMilError, match="attention_layer"):
        create_model("transmil", in_dim=16, attention_layer=3)


def test_transmil_threads_choosing_other_layers_get_their_own_attention():
    """Two threads calling one model with different layers each get their layer's attention."""
    import threading

    torch.manual_seed(3)
    model = create_model("transmil", in_dim=8, dim=16, heads=2, landmarks=8).eval()
    x = torch.randn(1, 40, 8)
    with torch.no_grad():
        expected = {layer: model(x, attention_layer=layer).attention for layer in (0, 1)}
    assert (expected[0] - expected[1]).abs().max() > 1e-3
    start, results = threading.Barrier(2), {0: [], 1: []}

    def run(layer):
        start.wait()
        with torch.no_grad():
            for _ in range(20):
                results[layer].append(model(x, attention_layer=layer).attention)

    threads = [threading.Thread(target=run, args=(layer,)) for layer in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for layer in (0, 1):
        assert len(results[layer]) == 20
        for attention in results[layer]:
            torch.testing.assert_close(attention, expected[layer], atol=1e-6, rtol=0)


def test_transmil_front_padding_is_sliced_off_correctly():
    """With front padding (landmarks < tokens), the fast class-token row equals row `pad` of the
    full Nyström attention matrix, restricted to the real tokens."""
    from napari_mil.models.transmil import iterative_pinv

    torch.manual_seed(1)
    model = create_model("transmil", in_dim=8, dim=32, heads=2, landmarks=8).eval()
    x = torch.randn(1, 30, 8)  # 36 tokens + class = 37 -> 3 padding tokens in front
    with torch.no_grad():
        tokens, _, _ = _transmil_tokens(model, x)
        attn = model.layer1.attn
        _, row = attn(model.layer1.norm(tokens))
        padded = torch.nn.functional.pad(model.layer1.norm(tokens), (0, 0, 3, 0))
        q, k, _ = attn.to_qkv(padded).chunk(3, -1)
        q = q.view(1, 40, 2, 16).transpose(1, 2) * attn.scale
        k = k.view(1, 40, 2, 16).transpose(1, 2)
        q_l, k_l = q.reshape(1, 2, 8, 5, 16).mean(-2), k.reshape(1, 2, 8, 5, 16).mean(-2)
        full = torch.softmax(q @ k_l.transpose(-1, -2), -1) @ iterative_pinv(torch.softmax(q_l @ k_l.transpose(-1, -2), -1)) @ torch.softmax(q_l @ k.transpose(-1, -2), -1)
    torch.testing.assert_close(row, full[:, :, 3, 3:], atol=1e-5, rtol=1e-4)


def test_ppeg_single_convolution_equals_the_three_and_trains_them():
    """PPEG runs x + conv7(x) + conv5(x) + conv3(x) as one merged 7x7 convolution: the output and
    each of the three convolutions' gradients must equal those of the literal sum."""
    from napari_mil.models.transmil import PPEG

    torch.manual_seed(0)
    ppeg, side = PPEG(16), 9
    tokens = torch.randn(2, side * side, 16)
    out = ppeg.encode(tokens, side)
    out.square().sum().backward()
    merged_grads = [p.grad.clone() for p in ppeg.parameters()]
    ppeg.zero_grad()
    grid = tokens.transpose(1, 2).reshape(2, 16, side, side)
    literal = (grid + ppeg.proj(grid) + ppeg.proj1(grid) + ppeg.proj2(grid)).flatten(2).transpose(1, 2)
    literal.square().sum().backward()
    torch.testing.assert_close(out, literal, atol=1e-5, rtol=1e-5)
    for merged, p in zip(merged_grads, ppeg.parameters(), strict=True):
        torch.testing.assert_close(merged, p.grad, atol=1e-4, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in merged_grads)


@pytest.mark.parametrize("output_slice", ["last", "first"])
def test_transmil_recomputed_attention_matches_the_stored_one(output_slice):
    """Long bags in training recompute the attention matrices in the backward pass: same logits,
    attention and gradients as keeping them, with either slicing of the Nyström output."""
    torch.manual_seed(0)
    model = create_model("transmil", in_dim=8, dim=32, heads=4, landmarks=8, dropout=0.0,
                         output_slice=output_slice).train()
    x = torch.randn(1, 200, 8)
    results = []
    for threshold in (10**9, 16):  # 200 instances + squaring + class token > 16: recomputed
        model.layer1.attn.recompute_above = model.layer2.attn.recompute_above = threshold
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out.logits, torch.tensor([1])).backward()
        results.append((out.logits, out.attention, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (logits_a, att_a, grads_a), (logits_b, att_b, grads_b) = results
    torch.testing.assert_close(logits_a, logits_b)
    torch.testing.assert_close(att_a, att_b)
    assert len(grads_a) == len(grads_b) > 10
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(a, b)


def test_transmil_official_defaults_and_big_bags():
    model = create_model("transmil", in_dim=1024)
    assert model.layer1.attn.heads == 8 and model.layer1.attn.landmarks == 256 and model.fc1[0].out_features == 512
    out = model.eval()(torch.randn(1, 3000, 1024))
    assert out.attention.shape == (1, 3000) and torch.isfinite(out.logits).all()


def test_abmil_learns_musk1():
    """Real MIL data: ABMIL trained on 4/5 of Musk1 classifies the held-out fifth."""
    import csv
    from pathlib import Path

    import numpy as np

    rows = list(csv.reader(open(Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "musk1.csv")))
    grouped, labels = {}, {}
    for r in rows:
        grouped.setdefault(r[1], []).append([float(v) for v in r[2:]])
        labels[r[1]] = int(r[0])
    ids = sorted(grouped)
    rng = np.random.default_rng(0)
    test_ids = set()
    for label in (0, 1):  # a stratified fifth for testing
        members = [i for i in ids if labels[i] == label]
        test_ids |= set(rng.choice(members, len(members) // 5, replace=False).tolist())
    train_ids = [i for i in ids if i not in test_ids]
    stacked = np.concatenate([grouped[i] for i in train_ids])
    mean, std = stacked.mean(0), stacked.std(0) + 1e-6
    bag = lambda i: torch.tensor((np.asarray(grouped[i]) - mean) / std, dtype=torch.float32)[None]  # noqa: E731
    torch.manual_seed(0)
    model = create_model("abmil", 166, embed_dim=128, attn_dim=64)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4, weight_decay=5e-3)
    for _ in range(20):
        for i in rng.permutation(train_ids):
            loss = torch.nn.functional.cross_entropy(model(bag(i)).logits, torch.tensor([labels[i]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = [model(bag(i)).logits.argmax().item() == labels[i] for i in sorted(test_ids)]
    assert len(correct) == 18 and np.mean(correct) >= 0.8
