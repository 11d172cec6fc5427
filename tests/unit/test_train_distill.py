"""The distillation term: zero when the student already matches the teacher, only on rows the
teacher gets right, and pulling the student toward the teacher."""

from types import SimpleNamespace

import torch

from agent.learner.train import _distill_loss


class Teacher(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, **batch):
        return SimpleNamespace(logits=self.logits)


def test_zero_when_student_matches_teacher():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert float(_distill_loss(t.clone(), Teacher(t), {}, torch.tensor([0, 1]), 2.0)) < 1e-7


def test_only_rows_the_teacher_gets_right():
    t = torch.tensor([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    student = torch.tensor([[2.0, 0.0, -1.0], [5.0, -5.0, 0.0]])  # row 2 far from the teacher
    # The teacher is wrong on row 2 (label 0, it says 1): that row must not count.
    assert float(_distill_loss(student, Teacher(t), {}, torch.tensor([0, 0]), 2.0)) < 1e-7
    assert float(_distill_loss(student, Teacher(t), {}, torch.tensor([0, 1]), 2.0)) > 0.1
    # No correct row at all: zero, and still a graph node (backward must work).
    student.requires_grad_(True)
    loss = _distill_loss(student, Teacher(t), {}, torch.tensor([2, 2]), 2.0)
    loss.backward()
    assert float(loss) == 0.0


def test_gradient_moves_student_toward_teacher():
    t = torch.tensor([[3.0, 0.0, 0.0]])
    s = torch.zeros(1, 3, requires_grad=True)
    _distill_loss(s, Teacher(t), {}, torch.tensor([0]), 2.0).backward()
    assert s.grad[0, 0] < 0 < s.grad[0, 1]  # descent raises the teacher's class


def test_per_token_targets_skip_ignored_tokens():
    # [texts, tokens, tags]: the second token is padding (-100); the student differs there only.
    t = torch.tensor([[[2.0, 0.0], [0.0, 2.0]]])
    student = torch.tensor([[[2.0, 0.0], [9.0, -9.0]]])
    assert float(_distill_loss(student, Teacher(t), {}, torch.tensor([[0, -100]]), 2.0)) < 1e-7
    assert float(_distill_loss(student, Teacher(t), {}, torch.tensor([[0, 1]]), 2.0)) > 0.1


def test_a_first_round_does_not_distil_toward_the_untrained_head(tiny_bundle, tmp_path):
    """Without a parent or anchor adapter there is nothing learned to keep: the distillation weight
    changes nothing (it pulled the NER benchmark's first adapter toward the random head)."""
    from safetensors.numpy import load_file

    from agent.learner.train import TrainConfig, train_adapter
    from tests.tiny import keyword_samples

    rows = keyword_samples(48, seed=2)
    weights = []
    for name, distill in (("plain", 0.0), ("distil", 1.0)):
        train_adapter(
            tiny_bundle,
            [t for t, _ in rows],
            [lab for _, lab in rows],
            tmp_path / name,
            name,
            TrainConfig(epochs=2, lr=1e-2, batch_size=16, threads=1, distill_weight=distill),
        )
        weights.append(load_file(str(tmp_path / name / "adapter_model.safetensors")))
    assert weights[0].keys() == weights[1].keys()
    assert all(
        torch.equal(torch.from_numpy(weights[0][k]), torch.from_numpy(weights[1][k])) for k in weights[0]
    )
