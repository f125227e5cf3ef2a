"""Students: exact parameter counts, output shapes at 84x84 and 32x32, head reset."""

import pytest
import torch

from tint.errors import TintError
from tint.io import set_threads
from tint.students import count_parameters, create_student, list_students

set_threads(1)

# Conv4: conv 3->64 (1,792) + 3 x conv 64->64 (36,928 each) + 4 BN (128 each).
CONV4_BACKBONE_PARAMS = 1_792 + 3 * 36_928 + 4 * 128  # 113,088
# ResNet12 64-128-256-512: 3 convs + 1x1 shortcut + 4 BN per module, no conv bias.
RESNET12_BACKBONE_PARAMS = 7_996_800


def test_registry_lists_both_students():
    assert {"conv4", "resnet12"} <= set(list_students())


def test_unknown_student_is_a_clear_error():
    with pytest.raises(TintError, match="conv4"):
        create_student("vgg99", 5)


def test_conv4_parameter_count():
    student = create_student("conv4", 5)
    assert count_parameters(student.backbone) == CONV4_BACKBONE_PARAMS == 113_088
    assert count_parameters(student.head) == 1600 * 5 + 5


def test_resnet12_parameter_count():
    student = create_student("resnet12", 5)
    assert count_parameters(student.backbone) == RESNET12_BACKBONE_PARAMS
    assert count_parameters(student) == RESNET12_BACKBONE_PARAMS + 512 * 5 + 5
    wide = create_student("resnet12", 5, widths=(64, 160, 320, 640))
    assert count_parameters(wide.backbone) == 12_424_320  # the other common ResNet12


@pytest.mark.parametrize("side, feature_dim", [(84, 1600), (32, 256)])
def test_conv4_shapes(side, feature_dim):
    student = create_student("conv4", 7, image_size=side).eval()
    x = torch.rand(3, 3, side, side)
    assert student.feature_dim == feature_dim
    assert student.embed(x).shape == (3, feature_dim)
    assert student(x).shape == (3, 7)


def test_conv4_rejects_the_wrong_input_size():
    student = create_student("conv4", 5, image_size=84)
    with pytest.raises(TintError, match="image_size=32"):
        student(torch.rand(1, 3, 32, 32))


def test_conv4_avg_pool_variant_is_size_independent():
    student = create_student("conv4", 5, pool="avg").eval()
    assert student.feature_dim == 64
    assert student(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert student(torch.rand(2, 3, 84, 84)).shape == (2, 5)


@pytest.mark.parametrize("side", [84, 32])
def test_resnet12_shapes(side):
    student = create_student("resnet12", 5).eval()
    batch = 1 if side == 84 else 2
    x = torch.rand(batch, 3, side, side)
    with torch.no_grad():
        assert student.embed(x).shape == (batch, 512)
        assert student(x).shape == (batch, 5)


def test_normalisation_is_inside_the_model():
    student = create_student("conv4", 5, image_size=32)
    norm = student.backbone.normalize
    x = torch.full((1, 3, 32, 32), 0.5)
    expected = (0.5 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(norm(x)[0, :, 0, 0], expected)
    assert "backbone.normalize.mean" in student.state_dict()
    assert all("normalize" not in name for name, _ in student.named_parameters())


def test_channels_last_gives_the_same_output():
    student = create_student("resnet12", 5, activation="leaky_relu").eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        reference = student(x)
        student = student.to(memory_format=torch.channels_last)
        out = student(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, reference, atol=1e-4)


def test_reset_head_and_backward():
    student = create_student("conv4", 5, image_size=32)
    student.reset_head(3)
    assert student.num_classes == 3
    loss = torch.nn.functional.cross_entropy(student(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 0]))
    loss.backward()
    assert student.head.weight.grad is not None
    assert student.backbone.blocks[0][0].weight.grad.abs().sum() > 0
