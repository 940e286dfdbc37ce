"""Dense box masks on a level grid (docs/method.md §1) and pooling / filling with dense masks, the way the
authors' code does it.

Only the reference ops and the mask ops use these; the kernels compute the same cell ranges in
csrc/common/box_math.h without ever materialising a mask.
"""
import torch


def box_masks(boxes, image_size, height, width):
    """Bool [N, height*width]: cell (i, j) of the level grid lies inside the box.

    Float64 throughout so the cells chosen are bit-for-bit those of the kernels.
    """
    in_h, in_w = image_size
    b = boxes.detach().to(torch.float64)
    x1, x2 = b[:, 0].clamp(0, in_w - 1), b[:, 2].clamp(0, in_w - 1)
    y1, y2 = b[:, 1].clamp(0, in_h - 1), b[:, 3].clamp(0, in_h - 1)
    valid = (x2 > x1) & (y2 > y1)  # also False for NaN
    rx, ry = width / in_w, height / in_h
    cols = torch.arange(width, dtype=torch.float64, device=b.device)
    rows = torch.arange(height, dtype=torch.float64, device=b.device)
    in_x = (cols >= (x1 * rx)[:, None]) & (cols <= (x2 * rx)[:, None])
    in_y = (rows >= (y1 * ry)[:, None]) & (rows <= (y2 * ry)[:, None])
    mask = in_y[:, :, None] & in_x[:, None, :] & valid[:, None, None]
    return mask.reshape(b.shape[0], height * width)


def masked_matmul(x, mask):
    """x @ mask for a 0/1 `mask`, reading x only where the mask is 1, as the kernels do: a plain matmul
    spreads a NaN or inf of x to every column (0 * NaN = NaN). Whether x holds one is read from the float64
    sum of the smaller of x and x @ mask (either has one if x does; one host sync, skipped while compiling);
    only then do three more matmuls count the NaN, +inf and -inf that each column reads."""
    out = x @ mask
    if torch.compiler.is_compiling() or bool(torch.isfinite(min(out, x, key=torch.numel).sum(dtype=torch.float64))):
        return out
    out = torch.where(torch.isfinite(x), x, 0) @ mask

    def reads(cells):
        return (cells.to(mask.dtype) @ mask) > 0

    pos, neg, nan = reads(x == torch.inf), reads(x == -torch.inf), reads(x.isnan())
    out = torch.where(pos, torch.inf, torch.where(neg, -torch.inf, out))
    return torch.where(nan | (pos & neg), torch.nan, out)


def pool_with_masks(features, masks, batch_idx, average):
    """[N, C]: masks [N, H*W] (features' dtype) times each object's image map; the mean if average."""
    n_img, channels, height, width = features.shape
    flat = features.reshape(n_img, channels, height * width)
    out = features.new_zeros(masks.shape[0], channels)
    for b in range(n_img):
        out = torch.where((batch_idx == b)[:, None], masked_matmul(flat[b], masks.T).T, out)
    return out / masks.sum(1, keepdim=True).clamp(min=1) if average else out


def fill_with_masks(values, masks, batch_idx, output_size, average):
    """[B, C, H, W]: each image's map is its values^T times its masks [N, H*W]; values / count if average."""
    n_img, height, width = output_size
    if average:
        values = values / masks.sum(1, keepdim=True).clamp(min=1)
    maps = [masked_matmul(values.T, masks * (batch_idx == b)[:, None]) for b in range(n_img)]
    return torch.stack(maps).reshape(n_img, values.shape[1], height, width)
