"""The U-Net matches Pytorch-UNet's module tree, state-dict keys and parameter counts."""

from __future__ import annotations

import re

import pytest
import torch

from unet_deploy.model import SplitUp, UNet, count_parameters, export_form, pad_to


def pytorch_unet_keys(bilinear: bool) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of Pytorch-UNet's UNet(3, 2, bilinear), written out from its documented
    layout (REFERENCE.md), independently of our model code."""
    factor = 2 if bilinear else 1
    keys: dict[str, tuple[int, ...]] = {}

    def double_conv(prefix: str, cin: int, cout: int, mid: int | None = None) -> None:
        mid = mid or cout
        keys[f"{prefix}.double_conv.0.weight"] = (mid, cin, 3, 3)
        for i, c in ((1, mid), (4, cout)):
            for name in ("weight", "bias", "running_mean", "running_var"):
                keys[f"{prefix}.double_conv.{i}.{name}"] = (c,)
            keys[f"{prefix}.double_conv.{i}.num_batches_tracked"] = ()
        keys[f"{prefix}.double_conv.3.weight"] = (cout, mid, 3, 3)

    double_conv("inc", 3, 64)
    chans = [64, 128, 256, 512, 1024 // factor]
    for i in range(4):
        double_conv(f"down{i + 1}.maxpool_conv.1", chans[i], chans[i + 1])
    ups = [(1024, 512 // factor), (512, 256 // factor), (256, 128 // factor), (128, 64)]
    for i, (cin, cout) in enumerate(ups):
        p = f"up{i + 1}"
        if bilinear:
            double_conv(f"{p}.conv", cin, cout, cin // 2)
        else:
            keys[f"{p}.up.weight"] = (cin, cin // 2, 2, 2)
            keys[f"{p}.up.bias"] = (cin // 2,)
            double_conv(f"{p}.conv", cin, cout)
    keys["outc.conv.weight"] = (2, 64, 1, 1)
    keys["outc.conv.bias"] = (2,)
    return keys


@pytest.mark.parametrize("bilinear,params", [(True, 17_263_042), (False, 31_037_698)])
def test_seed_architecture_keys_shapes_and_params(bilinear: bool, params: int) -> None:
    model = UNet(3, 2, bilinear=bilinear)
    state = model.state_dict()
    expected = pytorch_unet_keys(bilinear)
    assert set(state) == set(expected)
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key
    assert count_parameters(model) == params


def test_attribute_names_read_like_pytorch_unet() -> None:
    model = UNet(3, 2, bilinear=False, base_channels=8)
    names = {n for n, _ in model.named_children()}
    assert names == {"inc", "down1", "down2", "down3", "down4", "up1", "up2", "up3", "up4", "outc"}
    assert isinstance(model.down1.maxpool_conv[0], torch.nn.MaxPool2d)
    assert isinstance(model.up1.up, torch.nn.ConvTranspose2d)
    assert isinstance(UNet(bilinear=True, base_channels=8).up1.up, torch.nn.Upsample)


@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 61, 97), (1, 3, 33, 17), (1, 3, 40, 59)])
def test_output_shape_matches_input_at_odd_sizes(bilinear: bool, shape: tuple[int, ...]) -> None:
    model = UNet(3, 3, bilinear=bilinear, base_channels=4).eval()
    with torch.no_grad():
        out = model(torch.rand(*shape))
    assert out.shape == (shape[0], 3, shape[2], shape[3])
    assert torch.isfinite(out).all()


def test_narrow_models_keep_the_layout() -> None:
    small = UNet(1, 1, bilinear=True, base_channels=16)
    big = UNet(1, 1, bilinear=True, base_channels=64)
    assert set(small.state_dict()) == set(big.state_dict())
    assert count_parameters(small) * 10 < count_parameters(big)


def test_pad_to_splits_odd_differences_like_pytorch_unet() -> None:
    x1 = torch.ones(1, 1, 4, 5)
    x2 = torch.zeros(1, 1, 7, 8)
    out = pad_to(x1, x2)
    assert out.shape == (1, 1, 7, 8)
    rows = out[0, 0].sum(1).nonzero().flatten().tolist()
    cols = out[0, 0].sum(0).nonzero().flatten().tolist()
    assert rows[0] == 1 and rows[-1] == 4  # diff 3 -> 1 above, 2 below
    assert cols[0] == 1 and cols[-1] == 5


@pytest.mark.parametrize("bad", [dict(base_channels=3), dict(n_classes=0), dict(n_channels=0)])
def test_invalid_arguments_raise(bad: dict) -> None:
    with pytest.raises(ValueError, match=re.compile("must be", re.I)):
        UNet(**bad)


@pytest.mark.parametrize("bilinear,conv_bias", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("shape", [(1, 3, 61, 97), (2, 3, 64, 48)])
def test_export_form_computes_the_same_function(bilinear: bool, conv_bias: bool, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = UNet(3, 2, bilinear=bilinear, base_channels=8, conv_bias=conv_bias).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics, so folding them is exercised
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                assert m.running_mean is not None and m.running_var is not None
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.3, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    form = export_form(model)
    assert all(isinstance(getattr(form, f"up{i}"), SplitUp) for i in range(1, 5))
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for n, m in form.named_modules() if n.startswith("up"))
    assert isinstance(model.up1, torch.nn.Module) and not isinstance(model.up1, SplitUp)  # original untouched
    x = torch.rand(shape)
    with torch.no_grad():
        want, got = model(x), form(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_export_form_keeps_the_models_dtype() -> None:
    model = UNet(3, 2, bilinear=False, base_channels=8).eval().to(torch.bfloat16)
    form = export_form(model)
    assert {p.dtype for p in form.parameters()} == {torch.bfloat16}
    x = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        want = model.float()(x)
        got = form(x.to(torch.bfloat16)).float()
    assert (got.argmax(1) == want.argmax(1)).float().mean() > 0.99
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.05 * float(want.abs().max()))
