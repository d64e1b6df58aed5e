"""The unrolled feature pass is torchvision's forward; the projector has the published shape."""
import torch

from barlow.model import BarlowTwins, backbone, features, level_channels


def test_features_are_torchvisions_forward():
    torch.manual_seed(0)
    net = backbone("resnet18", zero_init_residual=False).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = features(net, x)
    assert [m.shape[1] for m in maps] == level_channels(net) == [64, 64, 128, 256, 512]
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4, 2]
    assert torch.allclose(maps[-1].mean((2, 3)), net(x), atol=1e-6)


def test_resnet50_levels_and_projector():
    m = BarlowTwins("resnet50", [8192, 8192, 8192])
    assert level_channels(m.backbone) == [64, 256, 512, 1024, 2048]
    linears = [l for l in m.projector if isinstance(l, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(2048, 8192), (8192, 8192), (8192, 8192)]
    assert [l.bias is not None for l in linears] == [True, True, False]
    bns = [l for l in m.projector if isinstance(l, torch.nn.BatchNorm1d)]
    assert len(bns) == 2
    # zero-init residual: the last BN of every bottleneck starts at 0
    assert all(float(b.bn3.weight.detach().abs().sum()) == 0 for layer in (m.backbone.layer1, m.backbone.layer4) for b in layer)
