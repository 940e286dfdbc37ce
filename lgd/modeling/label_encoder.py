"""Label encoders (docs/method.md §5): a label embedding per object from its descriptor, context object included.

Each object's descriptor (box, one-hot class, optional 7 x 7 mask crop, rescaled to [-1, 1]) goes through
LabelEncoder, the method's PointNet over each image's objects (one object = one point: STN(k), a shared
per-object MLP, STN(64), more MLP, a max over the objects of the same image, and a fusion MLP), or one of the
paper's Table 4 alternatives: MLPLabelEncoder (each object alone) and TransformerLabelEncoder (attention among
an image's objects). build_label_encoder picks one by name (lgd.label_encoder).
Objects are packed (PackedLabels): a 1x1 Conv1d over points is a Linear per object, so the layers are
nn.Linear on [N, C]; every LayerNorm of the MLPs normalizes one object's channels, without affine parameters.
"""
import torch
import torch.nn as nn

from .labels import MASK_CROP, PackedLabels
from .relation_adapter import padding_mask, per_image

STN_POOLS = ("object", "image")
LABEL_ENCODERS = ("pointnet", "mlp", "transformer")


def build_descriptors(labels: PackedLabels, num_classes: int, *, use_masks: bool = False) -> torch.Tensor:
    """[N, 4 + K (+ 49)] descriptors in [-1, 1], in the labels' box dtype.

    [0, 1] values first: the clamped box over (W_in, H_in, W_in, H_in), the one-hot class (all zeros for a
    context object), with use_masks the 7 x 7 mask crop; then x -> 2x - 1. Classes must be < num_classes and
    the labels built with masks for use_masks (LGDTeacher checks both).
    """
    in_h, in_w = labels.image_size
    x1, y1, x2, y2 = labels.boxes.unbind(1)  # scaled by Python numbers: no host-to-device copy
    boxes = torch.stack([x1 / in_w, y1 / in_h, x2 / in_w, y2 / in_h], dim=1)
    # compared with every class (a context object's -1 matches none) rather than F.one_hot, which reads the
    # largest class back from the device
    one_hot = (labels.classes[:, None] == torch.arange(num_classes, device=boxes.device)).to(boxes.dtype)
    parts = [boxes, one_hot]
    if use_masks:
        parts.append(labels.mask_crops.to(boxes.dtype))
    return torch.cat(parts, dim=1) * 2 - 1


def max_per_image(x: torch.Tensor, batch_idx: torch.Tensor, num_images: int) -> torch.Tensor:
    """[B, C]: the channel-wise max over each image's rows of x [N, C]; zeros for an image without rows."""
    index = batch_idx[:, None].expand_as(x)
    return x.new_zeros(num_images, x.shape[1]).scatter_reduce(0, index, x, "amax", include_self=False)


def _mlp(in_features, out_features):
    return nn.Sequential(nn.Linear(in_features, out_features),
                         nn.LayerNorm(out_features, elementwise_affine=False), nn.ReLU())


class SpatialTransformer(nn.Module):
    """STN(d): predicts a d x d matrix T from the points and returns each point transformed, x @ T.

    Point MLP d -> 64 -> 128 -> 1024, then (pool="object", the default and the method) each object gets
    its own T, as in the authors' code, which feeds every object to the STN as a one-point set; pool="image"
    (a variant, PointNet's one transform per cloud) takes the max over the image's objects first. Then
    1024 -> 512 -> 256 and a final Linear 256 -> d*d (docs/method.md, label encoder).
    Initialisation: that final Linear starts at weight 0, bias = identity, so T = I at the start (the
    PointNet / spatial-transformer convention) and the descriptors enter the network unchanged. The
    authors' code has neither the identity shortcut nor this initialisation (T starts as a small random
    matrix); the forward function class is the same, only the starting point differs.
    """

    def __init__(self, dim: int, pool: str = "object"):
        super().__init__()
        if pool not in STN_POOLS:
            raise ValueError(f"SpatialTransformer: pool must be one of {STN_POOLS}, got {pool!r}")
        self.dim, self.pool = dim, pool
        self.points = nn.Sequential(_mlp(dim, 64), _mlp(64, 128), _mlp(128, 1024))
        self.head = nn.Sequential(_mlp(1024, 512), _mlp(512, 256))
        self.matrix = nn.Linear(256, dim * dim)
        nn.init.zeros_(self.matrix.weight)
        with torch.no_grad():
            self.matrix.bias.copy_(torch.eye(dim).flatten())

    def forward(self, x: torch.Tensor, batch_idx: torch.Tensor, num_images: int) -> torch.Tensor:
        """x [N, d] -> [N, d]: row n times its transform."""
        feats = self.points(x)
        if self.pool == "image":
            transforms = self.matrix(self.head(max_per_image(feats, batch_idx, num_images)))[batch_idx]
        else:
            transforms = self.matrix(self.head(feats))
        return torch.bmm(x[:, None, :], transforms.view(-1, self.dim, self.dim))[:, 0]


class _DescriptorEncoder(nn.Module):
    """What every label encoder shares: the class count, the descriptor length 4 + K (+ 49 with use_masks, the
    Mask R-CNN variant) and the descriptors in the dtype of the encoder's first layer (`first`)."""

    def __init__(self, num_classes: int, use_masks: bool):
        super().__init__()
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"{type(self).__name__}: num_classes must be an int >= 1, got {num_classes!r}")
        self.num_classes, self.use_masks = num_classes, use_masks
        self.descriptor_dim = 4 + num_classes + (MASK_CROP ** 2 if use_masks else 0)

    def descriptors(self, labels: PackedLabels, first: nn.Linear) -> torch.Tensor:
        return build_descriptors(labels, self.num_classes, use_masks=self.use_masks).to(first.weight.dtype)


class LabelEncoder(_DescriptorEncoder):
    """Label embeddings [N, channels] from PackedLabels (docs/method.md §5): the PointNet, lgd.label_encoder
    "pointnet" (the method).

    Any number of classes K. Layers: STN(k) -> Linear(k, 64) LN ReLU -> STN(64) (this 64-d feature is kept) ->
    Linear(64, 128) LN ReLU -> Linear(128, 1024) LN ReLU -> max over the image's objects -> concat(64, 1024) ->
    Linear(1088, channels) LN ReLU -> Linear(channels, channels) LN ReLU. stn_pool: see SpatialTransformer.
    """

    def __init__(self, num_classes: int, *, channels: int = 256, use_masks: bool = False, stn_pool: str = "object"):
        super().__init__(num_classes, use_masks)
        self.input_transform = SpatialTransformer(self.descriptor_dim, stn_pool)
        self.embed = _mlp(self.descriptor_dim, 64)
        self.feature_transform = SpatialTransformer(64, stn_pool)
        self.lift = nn.Sequential(_mlp(64, 128), _mlp(128, 1024))
        self.fuse = nn.Sequential(_mlp(64 + 1024, channels), _mlp(channels, channels))

    def forward(self, labels: PackedLabels) -> torch.Tensor:
        """Inputs are validated by the caller (LGDTeacher)."""
        x = self.descriptors(labels, self.embed[0])
        idx, num_images = labels.batch_idx, labels.num_images
        local = self.feature_transform(self.embed(self.input_transform(x, idx, num_images)), idx, num_images)
        global_ = max_per_image(self.lift(local), idx, num_images)[idx]
        return self.fuse(torch.cat([local, global_], dim=1))


class MLPLabelEncoder(_DescriptorEncoder):
    """lgd.label_encoder "mlp" (the paper's Table 4): every object encoded alone, nothing shared between an
    image's objects. The PointNet's per-object widths without its two STNs and its max over the image:
    Linear k -> 64 -> 128 -> 1024 -> channels -> channels, each followed by LN and ReLU."""

    def __init__(self, num_classes: int, *, channels: int = 256, use_masks: bool = False):
        super().__init__(num_classes, use_masks)
        widths = [self.descriptor_dim, 64, 128, 1024, channels, channels]
        self.layers = nn.Sequential(*(_mlp(a, b) for a, b in zip(widths, widths[1:])))

    def forward(self, labels: PackedLabels) -> torch.Tensor:
        return self.layers(self.descriptors(labels, self.layers[0][0]))


class TransformerLabelEncoder(_DescriptorEncoder):
    """lgd.label_encoder "transformer" (the paper's Table 4 "TransEnc", 6 heads): each image's objects attend to
    one another. Linear(k, width) -> `depth` post-norm nn.TransformerEncoderLayer(width, heads, feed-forward
    4 * width, ReLU, dropout 0) over the image's objects (no positional encoding: the objects are a set, and
    each carries its box) -> Linear(width, channels) LN ReLU -> Linear(channels, channels) LN ReLU.
    width = 64 per head (384 for the paper's 6 heads: 256 does not split into 6) and depth 2 are lgd's choice;
    the paper gives only the head count and the authors' code has no such encoder (docs/method.md §5)."""

    def __init__(self, num_classes: int, *, channels: int = 256, use_masks: bool = False, num_heads: int = 6,
                 head_width: int = 64, depth: int = 2):
        super().__init__(num_classes, use_masks)
        width = num_heads * head_width
        self.embed = nn.Linear(self.descriptor_dim, width)
        layer = nn.TransformerEncoderLayer(width, num_heads, dim_feedforward=4 * width, dropout=0.0,
                                           batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.out = nn.Sequential(_mlp(width, channels), _mlp(channels, channels))

    def forward(self, labels: PackedLabels) -> torch.Tensor:
        x = self.embed(self.descriptors(labels, self.embed))
        if labels.num_objects:
            x = self.encoder(per_image(x, labels), src_key_padding_mask=padding_mask(labels))
            x = x[labels.batch_idx, labels.slots()]
        return self.out(x)


def build_label_encoder(kind: str, num_classes: int, *, channels: int = 256, use_masks: bool = False,
                        stn_pool: str = "object") -> nn.Module:
    """The label encoder lgd.label_encoder names; stn_pool applies to the PointNet only (the others have no STN)."""
    if kind == "pointnet":
        return LabelEncoder(num_classes, channels=channels, use_masks=use_masks, stn_pool=stn_pool)
    if kind == "mlp":
        return MLPLabelEncoder(num_classes, channels=channels, use_masks=use_masks)
    if kind == "transformer":
        return TransformerLabelEncoder(num_classes, channels=channels, use_masks=use_masks)
    raise ValueError(f"label_encoder must be one of {LABEL_ENCODERS}, got {kind!r}")
