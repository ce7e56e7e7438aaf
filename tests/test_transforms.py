"""The training transforms: the one-matrix colour jitter against torchvision's step-by-step ops."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from mmfl.data.transforms import ColorJitterAffine, to_float_images, train_transform


def _mid_range_image(seed: int = 0, size: int = 24) -> torch.Tensor:
    """A float RGB image with values in [0.3, 0.7]: factors near 1 never clip it."""
    gen = torch.Generator().manual_seed(seed)
    return 0.3 + 0.4 * torch.rand(3, size, size, generator=gen, dtype=torch.float64)


def _apply(a: torch.Tensor, t: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    return torch.einsum("ij,jhw->ihw", a, img) + t.view(3, 1, 1)


@pytest.mark.parametrize("order", list(itertools.permutations(["brightness", "contrast", "saturation"])))
def test_affine_jitter_equals_torchvision_ops_in_the_same_order(order: tuple[str, ...]) -> None:
    img = _mid_range_image()
    factors = {"brightness": 1.15, "contrast": 0.85, "saturation": 1.2}
    a, t = ColorJitterAffine.compose(list(order), factors, img.mean(dim=(1, 2)))
    expected = img.float()
    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
    for op in order:
        expected = ops[op](expected, factors[op])
    assert torch.allclose(_apply(a, t, img).float(), expected, atol=1e-5)


def test_affine_hue_is_a_chroma_rotation_in_torchvision_hue_direction() -> None:
    a, t = ColorJitterAffine.compose(["hue"], {"hue": 0.05}, torch.full((3,), 0.5, dtype=torch.float64))
    grey = torch.full((3, 1, 1), 0.4, dtype=torch.float64)
    assert torch.allclose(_apply(a, t, grey), grey, atol=1e-9)  # grey has no chroma to rotate
    img = _mid_range_image(1)
    out = _apply(a, t, img)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                       dtype=torch.float64)
    before, after = torch.einsum("ij,jhw->ihw", yiq, img), torch.einsum("ij,jhw->ihw", yiq, out)
    assert torch.allclose(after[0], before[0], atol=1e-9)  # luma kept
    assert torch.allclose(after[1:].norm(dim=0), before[1:].norm(dim=0), atol=1e-9)  # chroma magnitude kept
    angle = torch.atan2(after[2], after[1]) - torch.atan2(before[2], before[1])
    turned = torch.remainder(angle + torch.pi, 2 * torch.pi) - torch.pi
    assert torch.allclose(turned, torch.full_like(turned, -2 * torch.pi * 0.05), atol=1e-9)  # same turn everywhere
    # the direction agrees with torchvision's HSV hue shift: red turns towards yellow
    red = torch.tensor([0.6, 0.3, 0.3], dtype=torch.float64).view(3, 1, 1)
    ours, theirs = _apply(a, t, red).flatten(), TF.adjust_hue(red.float(), 0.05).flatten().double()
    assert ours[1] - ours[2] > 0.02 and theirs[1] - theirs[2] > 0.02  # green rises above blue in both
    identity, offset = ColorJitterAffine.compose(["hue"], {"hue": 0.0}, img.mean(dim=(1, 2)))
    assert torch.allclose(identity, torch.eye(3, dtype=torch.float64), atol=1e-12) and not offset.any()


def test_affine_jitter_on_a_pil_image_applies_its_matrix() -> None:
    rgb = (np.random.default_rng(0).random((16, 16, 3)) * 160 + 40).astype(np.uint8)
    jitter = ColorJitterAffine(0.3, 0.3, 0.3, 0.05)
    torch.manual_seed(5)
    order, factors = jitter.draw()
    assert sorted(order) == ["brightness", "contrast", "hue", "saturation"]
    assert all(abs(factors[k] - 1) <= 0.3 for k in ("brightness", "contrast", "saturation"))
    assert abs(factors["hue"]) <= 0.05
    torch.manual_seed(5)
    out = np.asarray(jitter(Image.fromarray(rgb))).astype(np.float64)
    mean = torch.tensor(rgb.reshape(-1, 3).mean(0), dtype=torch.float64)
    a, t = ColorJitterAffine.compose(order, factors, mean)
    expected = np.clip(rgb.astype(np.float64) @ a.numpy().T + t.numpy(), 0, 255)
    assert np.abs(out - expected).max() <= 1.0  # PIL rounds to uint8
    assert np.abs(out - rgb).mean() > 1.0  # and it did change the image


def test_affine_jitter_rejects_bad_settings_and_inputs() -> None:
    with pytest.raises(ValueError, match="hue"):
        ColorJitterAffine(0.2, 0.2, 0.2, 0.7)
    with pytest.raises(TypeError, match="RGB PIL"):
        ColorJitterAffine(0.2, 0.2, 0.2, 0.05)(Image.new("L", (4, 4)))
    assert ColorJitterAffine(0, 0, 0, 0).draw() == ([], {})


def test_train_transform_is_repeatable_and_in_range() -> None:
    img = Image.fromarray((np.random.default_rng(1).random((80, 60, 3)) * 255).astype(np.uint8))
    transform = train_transform(48)
    torch.manual_seed(3)
    first = transform(img)
    torch.manual_seed(3)
    again = transform(img)
    assert first.shape == (3, 48, 48) and first.dtype == torch.uint8  # scaled to float on the device
    assert torch.equal(first, again)
    as_float = to_float_images(first.unsqueeze(0), channels_last=True)
    assert as_float.dtype == torch.float32 and as_float.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(as_float[0] * 255.0, first.float(), atol=1e-4)
    torch.manual_seed(4)
    assert not torch.equal(transform(img), first)
