"""A student initialised from the teacher's own weights, data-free: the teacher's BatchNorm
folded into its convolutions, then every layer zipped down to the student's width within
the one network (ZipIt!'s matching, `dafl.zipit`): the most correlated pairs of features
are averaged into one, and the next layer reads the merged feature where it read each
member. The correlations come from unlabeled images; `StudentDistillation` passes its
image source's reference images (the pool of shapes inverted through the teacher), so
no real data is needed.

Why: the student's own randomness (its initialisation and batches) decides much of where
it ends, mostly on the classes the teacher separates finely; a start from the teacher's
features removes the initialisation's part. The default, `student_init: auto`, zips where the
pair allows it and the teacher has BatchNorm, and starts at random elsewhere; measurements are
in benchmarks/.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from dafl.errors import ConfigError
from dafl.models import LeNet5
from dafl.zipit import feature_correlations, merge_tensor, zip_match
from dafl.zipped import merge_spec


def fold_batchnorm(net: LeNet5) -> LeNet5:
    """A copy of `net` with each conv's BatchNorm (running statistics) folded into the conv:
    the same function in eval mode, without BatchNorm layers."""
    folded = copy.deepcopy(net).eval()
    layers = folded.features
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.BatchNorm2d):
            conv = layers[index - 1]
            scale = layer.weight.detach() / (layer.running_var + layer.eps).sqrt()
            with torch.no_grad():
                conv.weight.mul_(scale.view(-1, 1, 1, 1))
                conv.bias.copy_((conv.bias - layer.running_mean) * scale + layer.bias)
            layers[index] = nn.Identity()
    return folded


def zip_refusal(teacher: nn.Module, student: nn.Module) -> str | None:
    """Why `zip_teacher_into_student` cannot make `student` from `teacher` (one line), or None."""
    if not (isinstance(teacher, LeNet5) and isinstance(student, LeNet5)):
        return (f"student_init 'zip_teacher' needs a LeNet-5 teacher and student "
                f"(got {type(teacher).__name__} and {type(student).__name__})")
    if any(isinstance(m, nn.BatchNorm2d) for m in student.modules()):
        return "student_init 'zip_teacher' needs a student without BatchNorm (e.g. lenet5_half)"
    teacher_widths, student_widths = merge_spec(teacher).channels, merge_spec(student).channels
    for space, width in student_widths.items():
        if width > teacher_widths[space]:
            return (f"student_init 'zip_teacher': the student's {space} has {width} features, "
                    f"more than the teacher's {teacher_widths[space]}")
    if teacher.feature_dim // teacher_widths["conv3"] != student.feature_dim // student_widths["conv3"]:
        return "student_init 'zip_teacher': teacher and student see different image sizes"
    return None


def check_zippable(teacher: nn.Module, student: nn.Module) -> None:
    """A one-line ConfigError unless `zip_teacher_into_student` can make `student` from `teacher`."""
    refusal = zip_refusal(teacher, student)
    if refusal:
        raise ConfigError(refusal)


@torch.no_grad()
def zip_teacher_into_student(teacher: nn.Module, student: nn.Module, images: torch.Tensor,
                             alpha: float = 0.3, batch_size: int = 256) -> None:
    """Overwrite `student`'s weights (in place, so an optimizer keeps them) with `teacher`
    zipped to the student's width, feature correlations measured on `images`. Both must be
    LeNet-5s of one geometry; the student no wider than the teacher and without BatchNorm."""
    check_zippable(teacher, student)
    folded = fold_batchnorm(teacher)
    student_widths = merge_spec(student).channels
    device = next(folded.parameters()).device
    correlations = feature_correlations([folded], images.to(device).split(batch_size))
    # beta 1: the one model may merge as many of its own features as it takes to reach the width
    matches = {space: zip_match(corr, 1, alpha=alpha, beta=1.0, target=student_widths[space])
               for space, corr in correlations.items()}
    source = folded.state_dict()
    state = {}
    for key, (out_space, in_space, repeat) in merge_spec(folded).params.items():
        weight = source[key].cpu()
        merge = matches[out_space][0] if out_space else torch.eye(weight.shape[0])
        unmerge = matches[in_space][1] if in_space else None
        state[key] = merge_tensor([weight], merge, unmerge, repeat)
    student.load_state_dict(state)
