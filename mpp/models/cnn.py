"""The CNN a user would otherwise train on their labels: a timm ResNet with a small-image stem.

ImageNet ResNets cut a 224 px image by 4 before the first block (a 7x7 stride-2 convolution, then a max-pool), which
leaves 7x7 of a 28x28 image. For small images the stem is a 3x3 stride-1 convolution and no max-pool, as in the
CIFAR ResNets (He et al. 2016, section 4.2). ``widths`` and ``blocks`` make it narrower or shallower than resnet18
(64-512 wide, 2 blocks per stage), which trains at ~22 images/s on 2 CPU cores.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


class SmallImageResNet(nn.Module):
    """A ResNet classifier for small images: ``[N, C, H, W] -> [N, num_classes]``.

    ``depth`` is 0 so that :func:`mpp.train.optim.layer_decay_param_groups` gives every parameter the same lr (layer
    decay is a ViT fine-tuning device); 1-D tensors still get no weight decay.
    """

    depth = 0

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 1,
        widths: Sequence[int] = (32, 64, 128, 256),
        blocks: Sequence[int] = (1, 1, 1, 1),
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if len(widths) != 4 or len(blocks) != 4:  # timm's ResNet runs exactly four stages
            raise ValueError(f"a ResNet has four stages: got widths {list(widths)} and blocks {list(blocks)}")
        self.num_classes = num_classes
        self.config = {"widths": list(widths), "blocks": list(blocks), "in_chans": in_chans}
        net = ResNet(
            BasicBlock,
            tuple(blocks),
            num_classes=num_classes,
            in_chans=in_chans,
            channels=tuple(widths),
            drop_path_rate=drop_path_rate,
        )
        # timm's plain stem is 64 wide whatever the stages are; only its kernel, stride and pooling change here.
        net.conv1 = nn.Conv2d(in_chans, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
        self.net = net

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """Logits: ``[N, C, H, W] -> [N, num_classes]``."""
        return self.net(imgs)
