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
