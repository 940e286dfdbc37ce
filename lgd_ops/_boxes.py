"""Dense box masks on a level grid (docs/method.md §1) and pooling / filling with dense masks, the way the
authors' code does it.

The reference ops and the mask ops use the masks; box_cells is the rule itself, shared with the Triton glue
(csrc/common/box_math.h is its C++ twin). The kernels never materialise a mask: they read a level index
(level_index), the boxes' cells and row events on one level.
"""
import torch


def box_cells(boxes, batch_idx, batch, in_h, in_w, height, width):
    """(cells, covers): int32 [N, 4] = (x0, x1, y0, y1) inclusive cell ranges on a height x width grid,
    (0, -1, 0, -1) for a box covering nothing, and bool [N], the box covers at least one cell.

    docs/method.md §1, the one Python statement of the rule (the reference, the mask ops and the Triton
    glue use it; csrc/common/box_math.h box_cells is its C++ twin, with the same float64 arithmetic, so
    every backend picks bit-for-bit the same cells): clamp to [0, in_w-1] x [0, in_h-1]; x2 <= x1,
    y2 <= y1 or NaN covers nothing; rx = width / in_w, x0 = ceil(x1 * rx), x1 = min(floor(x2 * rx),
    width - 1); rows alike. A batch index outside [0, batch) covers nothing (the public ops reject it).
    """
    b = boxes.detach().to(torch.float64)
    x1 = b[:, 0].clamp(0.0, float(in_w - 1))
    y1 = b[:, 1].clamp(0.0, float(in_h - 1))
    x2 = b[:, 2].clamp(0.0, float(in_w - 1))
    y2 = b[:, 3].clamp(0.0, float(in_h - 1))
    valid = (x2 > x1) & (y2 > y1) & (batch_idx >= 0) & (batch_idx < batch)  # False for NaN too
    rx = float(width) / float(in_w)  # double(w) / double(in_w), as in box_math.h
    ry = float(height) / float(in_h)
    ranges = torch.stack(
        [
            torch.ceil(x1 * rx),
            torch.floor(x2 * rx).clamp(max=float(width - 1)),
            torch.ceil(y1 * ry),
            torch.floor(y2 * ry).clamp(max=float(height - 1)),
        ],
        dim=1,
    )
    none = torch.tensor([0.0, -1.0, 0.0, -1.0], dtype=torch.float64, device=b.device)
    cells = torch.where(valid[:, None], ranges, none).to(torch.int32).contiguous()
    covers = valid & (cells[:, 0] <= cells[:, 1]) & (cells[:, 2] <= cells[:, 3])
    return cells, covers


def sweep_events(cells, covers, batch_idx, batch, height):
    """The row sweeps' events (docs/method.md §1-3, csrc/common/box_sweep_math.h): box n's top event 2n at row
    y0 and bottom event 2n + 1 at row y1 + 1, keyed image * (height + 2) + row (boxes covering nothing after
    every image, key batch * (height + 2)). Returns (keys, ids, start): int64 keys ascending, the event ids in
    key order (box order within a row: a stable sort), and int64 [batch + 1] with image b's events at
    [start[b], start[b + 1])."""
    rows = torch.stack([cells[:, 2], cells[:, 3] + 1], dim=1).reshape(-1).to(torch.int64)
    img = batch_idx.to(torch.int64).repeat_interleave(2)
    keys = torch.where(covers.repeat_interleave(2), img * (height + 2) + rows,
                       torch.full_like(rows, batch * (height + 2)))
    keys, ids = torch.sort(keys, stable=True)
    start = torch.searchsorted(keys, torch.arange(batch + 1, dtype=keys.dtype, device=keys.device) * (height + 2))
    return keys, ids, start


INDEX_MAX_KEY = 2**31 - 1


def level_index(boxes, batch_idx, batch, in_h, in_w, height, width):
    """The level index of N boxes on a height x width level of `batch` images: one int32 tensor of
    8 N + batch + 1 entries, on the boxes' device, that every kernel reads instead of the boxes:

        [0, 4N)          cells: box n's (x0, x1, y0, y1) at 4n (box_cells; (0, -1, 0, -1) covers nothing)
        [4N, 6N)         event keys, ascending: image * (height + 2) + row (sweep_events)
        [6N, 8N)         event ids in key order: 2 n (top, row y0) or 2 n + 1 (bottom, row y1 + 1)
        [8N, 8N+batch+1) start: image b's events are [start[b], start[b + 1]) of the two event arrays

    Built once per batch and level on the host from the loader's CPU boxes (no device sync), its size alone
    ties it to (N, batch); the ops check that size and nothing else."""
    if (batch + 1) * (height + 2) > INDEX_MAX_KEY:
        raise ValueError(f"level index: {batch} images of {height} rows exceed int32 event keys")
    cells, covers = box_cells(boxes, batch_idx, batch, in_h, in_w, height, width)
    keys, ids, start = sweep_events(cells, covers, batch_idx, batch, height)
    parts = [cells.reshape(-1), keys.to(torch.int32), ids.to(torch.int32), start.to(torch.int32)]
    return torch.cat(parts)


def index_size(num_boxes, batch):
    """The number of entries of a level index of num_boxes boxes over batch images."""
    return 8 * num_boxes + batch + 1


def box_masks(boxes, image_size, height, width):
    """Bool [N, height*width]: cell (i, j) of the level grid lies inside the box (box_cells' ranges)."""
    in_h, in_w = image_size
    n = boxes.shape[0]
    cells, _ = box_cells(boxes, torch.zeros(n, dtype=torch.int64, device=boxes.device), 1, in_h, in_w, height, width)
    cols = torch.arange(width, dtype=torch.int32, device=boxes.device)
    rows = torch.arange(height, dtype=torch.int32, device=boxes.device)
    in_x = (cols >= cells[:, 0:1]) & (cols <= cells[:, 1:2])
    in_y = (rows >= cells[:, 2:3]) & (rows <= cells[:, 3:4])
    mask = in_y[:, :, None] & in_x[:, None, :]
    return mask.reshape(n, height * width)


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
