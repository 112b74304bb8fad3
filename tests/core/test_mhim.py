"""MHIM-MIL pieces: masks, schedules, the EMA teacher and the consistency loss."""

import math

import numpy as np
import pytest
import torch

from napari_mil.errors import NapariMilError
from napari_mil.models import create_model
from napari_mil.training.mhim import (
    PRESETS,
    MHIMConfig,
    MHIMTrainer,
    class_aware_score,
    consistency_loss,
    cosine_schedule,
    ema_update,
    make_teacher,
    preset,
    select_masks,
)


def test_masks_take_exactly_the_configured_fractions():
    attention = torch.arange(100, dtype=torch.float32).flip(0)  # instance 0 highest
    cfg = MHIMConfig(mask_ratio=0.5, mask_ratio_l=0.2, mask_ratio_h=0.1, mask_ratio_hr=0.5)
    masks = select_masks(attention, cfg, generator=torch.Generator().manual_seed(0))
    assert masks.high.sum() == 5 and masks.high[:10].sum() == 5  # half of the top 10
    assert masks.low.sum() == 20 and masks.low[80:].all()  # the bottom 20
    assert masks.random.sum() == int(0.5 * 75)  # half of the 75 left
    assert not (masks.high & masks.low).any() and not (masks.random & (masks.high | masks.low)).any()
    assert masks.kept.sum() == 100 - 5 - 20 - 37


def test_masks_follow_the_teacher_not_the_position():
    gen = torch.Generator().manual_seed(1)
    attention = torch.rand(50, generator=gen)
    masks = select_masks(attention, MHIMConfig(mask_ratio_h=0.2, mask_ratio_hr=1.0, mask_ratio_l=0.2))
    top = set(torch.argsort(attention, descending=True)[:10].tolist())
    bottom = set(torch.argsort(attention)[:10].tolist())
    assert set(torch.nonzero(masks.high).flatten().tolist()) == top
    assert set(torch.nonzero(masks.low).flatten().tolist()) == bottom


def test_never_masks_the_whole_bag():
    masks = select_masks(torch.rand(3), MHIMConfig(mask_ratio=1.0, mask_ratio_l=1.0))
    assert masks.kept.sum() >= 1


def test_cosine_schedules_follow_their_curve():
    values = cosine_schedule(0.01, 0.0, 100)
    assert values[0] == pytest.approx(0.01) and values[50] == pytest.approx(0.005)
    assert np.all(np.diff(values) < 0)
    for i in (10, 37, 99):
        assert values[i] == pytest.approx(0.5 * 0.01 * (1 + math.cos(math.pi * i / 100)))
    momentum = cosine_schedule(0.9999, 1.0, 10)
    assert momentum[0] == pytest.approx(0.9999) and np.all(np.diff(momentum) > 0) and momentum[-1] < 1.0


def test_ema_update_is_exact_and_the_teacher_gets_no_gradient():
    torch.manual_seed(0)
    student = create_model("abmil", in_dim=8)
    teacher = make_teacher(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    before = [p.clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.9)
    for t, b, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * s)
    trainer = MHIMTrainer(student, MHIMConfig(mask_ratio=0.5, alpha=0.5), total_steps=10)
    loss, _, _ = trainer.loss(torch.randn(1, 20, 8), torch.tensor([1]))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in trainer.teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_consistency_loss_matches_a_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0]])
    teacher = torch.tensor([[0.2, 0.1, 0.0]])
    t = [math.exp(v / 0.1) for v in (0.2, 0.1, 0.0)]
    target = [v / sum(t) for v in t]
    s = [math.exp(v / 1.0) for v in (1.0, 0.0, -1.0)]
    log_q = [math.log(v / sum(s)) for v in s]
    expected = -sum(p * q for p, q in zip(target, log_q))
    assert consistency_loss(student, teacher, 0.1, 1.0).item() == pytest.approx(expected, rel=1e-6)


def test_trainer_steps_schedules_and_records_every_step():
    torch.manual_seed(0)
    student = create_model("abmil", in_dim=8)
    trainer = MHIMTrainer(student, preset("camelyon16_abmil"), total_steps=4, seed=3)
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=1e-3)
    ratios = []
    for step in range(4):
        ratios.append(trainer.current_ratio_h())
        loss, out, masks = trainer.loss(torch.randn(1, 200, 8), torch.tensor([step % 2]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        trainer.after_optimizer_step()
        assert out.attention.shape[1] == int(masks.kept.sum())
        record = trainer.history[-1]
        assert (record.step, record.instances) == (step, 200)
        assert (record.high, record.low, record.random) == tuple(int(m.sum()) for m in (masks.high, masks.low, masks.random))
        assert record.mask_ratio == pytest.approx(float(masks.masked.float().mean()))
        for kind in ("high", "low", "random"):
            assert torch.equal(getattr(trainer.last_masks, kind), getattr(masks, kind))
    assert len(trainer.history) == 4 and ratios[0] == pytest.approx(0.01) and ratios == sorted(ratios, reverse=True)
    assert trainer.history[0].random > 0


def _history_bytes(trainer) -> int:
    """The bytes held by a trainer's mask records: the records themselves and the last masks."""
    import sys

    held = sys.getsizeof(trainer.history) + sum(sys.getsizeof(r) for r in trainer.history)
    return held + sum(m.element_size() * m.nelement() for m in vars(trainer.last_masks).values())


def test_mask_history_does_not_grow_with_the_steps():
    """What the trainer keeps of its masks is bounded (the last ``history_steps`` records, the
    latest step's masks) and holds no tensor on a device or in an autograd graph."""
    torch.manual_seed(0)
    student = create_model("abmil", in_dim=8)
    trainer = MHIMTrainer(student, MHIMConfig(mask_ratio=0.5, mask_ratio_l=0.1, mask_ratio_h=0.2), total_steps=100,
                          history_steps=8)
    held = []
    for step in range(40):
        loss, _, _ = trainer.loss(torch.randn(1, 300, 8, requires_grad=True), torch.tensor([step % 2]))
        loss.backward()
        trainer.after_optimizer_step()
        if step + 1 in (10, 40):
            held.append(_history_bytes(trainer))
    assert len(trainer.history) == 8 and [r.step for r in trainer.history] == list(range(32, 40))
    assert held[0] == held[1]
    for record in trainer.history:
        assert not any(isinstance(v, torch.Tensor) for v in (record.step, record.instances, record.high, record.low,
                                                             record.random))
    for mask in vars(trainer.last_masks).values():
        assert mask.device.type == "cpu" and not mask.requires_grad and mask.grad_fn is None and mask.shape == (300,)


def test_presets_are_the_official_recipes():
    assert set(PRESETS) == {"camelyon16_abmil", "tcga_abmil", "camelyon16_transmil", "tcga_transmil"}
    c16 = PRESETS["camelyon16_abmil"]
    assert (c16.mask_ratio, c16.mask_ratio_h, c16.mask_ratio_hr, c16.alpha) == (0.5, 0.01, 0.5, 0.1)
    with pytest.raises(KeyError, match="camelyon16_abmil"):
        preset("c17")


def test_class_aware_score_matches_a_hand_computation_and_drives_the_masks():
    torch.manual_seed(1)
    model = create_model("abmil", in_dim=6, n_classes=2, embed_dim=4, attn_dim=3).eval()
    x = torch.randn(1, 5, 6)
    out = model(x)
    h = torch.relu(x[0] @ model.embed[0].weight.T + model.embed[0].bias)  # (5, 4)
    a = out.attention[0]
    expected = []
    for k in range(5):
        logits = model.classifier.weight @ (a[k] * h[k])  # the bias is the same for every instance: left out
        expected.append(torch.softmax(logits, 0).max())
    assert torch.allclose(class_aware_score(model, out)[0], torch.stack(expected), atol=1e-6)

    # the teacher masks by that score, not by attention, when asked to
    cfg = MHIMConfig(mask_ratio_h=0.4, mask_ratio_hr=1.0, score="class_aware")
    trainer = MHIMTrainer(model, cfg, total_steps=1)
    _, _, masks = trainer.loss(x, torch.tensor([1]))
    top = set(torch.argsort(class_aware_score(trainer.teacher, trainer.teacher(x))[0], descending=True)[:2].tolist())
    assert set(torch.nonzero(masks.high).flatten().tolist()) == top

    with pytest.raises(NapariMilError, match="attention-pooling model"):
        MHIMTrainer(create_model("transmil", in_dim=6, dim=16, heads=2, landmarks=4), cfg, 1).loss(x, torch.tensor([1]))
    with pytest.raises(NapariMilError, match="score must be"):
        MHIMTrainer(model, MHIMConfig(score="gradcam"), 1)


@pytest.mark.parametrize("attn_layer", [0, 1])
def test_a_transmil_teacher_scores_with_the_configured_layer(attn_layer):
    """The teacher's ranking reads ``attn_layer``'s attention as a call argument; the teacher
    itself keeps its default (layer 2) for every other caller."""
    torch.manual_seed(4)
    student = create_model("transmil", in_dim=6, dim=16, heads=2, landmarks=8)
    cfg = MHIMConfig(mask_ratio_h=0.2, mask_ratio_hr=1.0, attn_layer=attn_layer)
    trainer = MHIMTrainer(student, cfg, total_steps=1)
    x = torch.randn(1, 50, 6)
    _, _, masks = trainer.loss(x, torch.tensor([1]))
    with torch.no_grad():
        chosen = trainer.teacher(x, attention_layer=attn_layer).attention[0]
        other = trainer.teacher(x, attention_layer=1 - attn_layer).attention[0]
    assert set(torch.nonzero(masks.high).flatten().tolist()) == set(torch.argsort(chosen, descending=True)[:10].tolist())
    assert set(torch.argsort(other, descending=True)[:10].tolist()) != set(torch.argsort(chosen, descending=True)[:10].tolist())
    assert trainer.teacher.default_attention_layer == 1
