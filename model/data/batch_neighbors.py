"""Neighbour lists of a whole batch in torch, on the training device: candidates within rcut over
the periodic images, then the typed or mixed lists each NlistRequest asks for (data/neighbor.py:
the per-frame numpy reference and the shared types)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamflow.model.data.neighbor import BatchGraph, NeighborOverflow, NlistRequest, build_graph


def _image_grid(nmax: list[int], dtype, device) -> torch.Tensor:
    """[nimg, 3] non-zero image vectors within +-nmax per axis, lexicographic (as find_pairs orders them)."""
    axes = [torch.arange(-n, n + 1, device=device) for n in nmax]
    grid = torch.cartesian_prod(*axes).reshape(-1, 3)
    return grid[(grid != 0).any(dim=1)].to(dtype)


def _on(values: tuple[int, ...], device) -> torch.Tensor:
    """A small long tensor made on the device itself (no host -> device copy)."""
    return torch.stack([torch.full((), v, dtype=torch.long, device=device) for v in values])


@dataclass
class _Candidates:
    """Per frame the possible neighbours: the nloc local slots, then up to ncand ghost candidates."""

    qpos: torch.Tensor  # [nf, nloc, 3] wrapped local positions (padded slots far away): the centres
    cpos: torch.Tensor  # [nf, nloc + ncand, 3] candidate positions (empty ones far away)
    ctype: torch.Tensor  # [nf, nloc + ncand] type (0 where empty)
    wrap: torch.Tensor  # [nf, nloc, 3] integer cell vectors taken off each local atom
    gatom: torch.Tensor  # [nf, ncand] local atom of each ghost candidate
    gshift: torch.Tensor  # [nf, ncand, 3] its image vector (coord_ext = coord[gatom] + gshift @ box)


def _candidates(coord, atype, box, pbc, rcut: float) -> _Candidates:
    """Locals wrapped into the cell as find_pairs wraps them; ghost candidates are the images (range from
    the plane spacings: any triclinic cell, cells smaller than 2 rcut) whose fractional coordinates lie
    within rcut of the cell. Two syncs: the image range (3 ints) and the candidate count (1 int)."""
    dev, dt = coord.device, coord.dtype
    nf, nloc = atype.shape
    real = atype >= 0
    pbc = torch.zeros(nf, dtype=torch.bool, device=dev) if box is None else pbc.to(dev).bool()
    eye = torch.eye(3, dtype=dt, device=dev).expand(nf, 3, 3)
    cell = eye if box is None else torch.where(pbc[:, None, None], box.to(dt), eye)
    a, b, c = cell[:, 0], cell[:, 1], cell[:, 2]
    crosses = torch.stack([torch.linalg.cross(b, c), torch.linalg.cross(c, a), torch.linalg.cross(a, b)], dim=1)
    det = (a * crosses[:, 0]).sum(-1)
    frac = coord @ (crosses.transpose(1, 2) / det[:, None, None])  # the inverse cell without a solver (no sync)
    wrap = torch.where(pbc[:, None, None] & real[..., None], torch.floor(frac), torch.zeros_like(frac))
    frac = frac - wrap
    pos = torch.where(pbc[:, None, None], frac @ cell, coord)
    vol = det.abs()[:, None]
    margin = torch.where(pbc[:, None], rcut * crosses.norm(dim=-1) / vol, torch.zeros_like(vol))  # rcut / plane spacing
    images = _image_grid(torch.ceil(margin).amax(dim=0).long().tolist(), dt, dev)  # sync 1: image range
    nimg = images.shape[0]
    if nimg:
        efrac = frac[:, None] + images[None, :, None]  # [nf, nimg, nloc, 3]
        keep = ((efrac > -margin[:, None, None]) & (efrac < 1 + margin[:, None, None])).all(dim=-1)
        keep = (keep & real[:, None] & pbc[:, None, None]).reshape(nf, nimg * nloc)
        ncand = int(keep.sum(dim=1).amax().tolist())  # sync 2: number of ghost candidates
    else:
        keep, ncand = torch.zeros(nf, 0, dtype=torch.bool, device=dev), 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :ncand]  # kept first, image-major
    gvalid = keep.gather(1, order)
    gimg, gatom = order // nloc, order % nloc
    idx3 = gatom[..., None].expand(-1, -1, 3)
    gpos = (frac.gather(1, idx3) + images[gimg]) @ cell
    cvalid = torch.cat([real, gvalid], dim=1)
    far = torch.full((), 1e15, dtype=dt, device=dev)  # beyond any rcut
    return _Candidates(qpos=torch.where(real[..., None], pos, -far),
                       cpos=torch.where(cvalid[..., None], torch.cat([pos, gpos], dim=1), far),
                       ctype=torch.where(cvalid, torch.cat([atype, atype.gather(1, gatom)], dim=1), 0),
                       wrap=wrap, gatom=gatom, gshift=images[gimg] - wrap.gather(1, idx3))


def _mixed_block(dr: torch.Tensor, within: torch.Tensor, sel: int):
    """One block of `sel` slots by distance: (nlist [..., sel], count [..., 1])."""
    cnt = within.sum(dim=-1, keepdim=True)
    k = min(sel, dr.shape[-1])
    _, idx = torch.topk(dr, k, dim=-1, largest=False, sorted=True)
    nl = torch.where(torch.arange(k, device=dr.device) < cnt, idx, -1)
    return torch.nn.functional.pad(nl, (0, sel - k), value=-1), cnt


def _mixed_prefix(base_nl: torch.Tensor, within: torch.Tensor, sel: int):
    """A mixed list at rcut <= the base list's rcut and sel <= its sel: the first min(count, sel) slots
    of the base list (sorted by distance, so exactly the neighbours within rcut, or the nearest sel of
    them; also when the base list was truncated, as the count here is the full row's)."""
    cnt = within.sum(dim=-1, keepdim=True)
    k = min(sel, base_nl.shape[-1])
    nl = torch.where(torch.arange(k, device=base_nl.device) < cnt, base_nl[..., :k], -1)
    return torch.nn.functional.pad(nl, (0, sel - k), value=-1), cnt


def _typed_blocks(dr, within, ctype, onehot, req: NlistRequest, truncate: bool, big: float):
    """One block per neighbour type from a single topk over distance + type * big (float64, so the
    order within a type is the distance order): block t takes ranks start_t .. start_t + sel_t of the
    row, start_t = the number of neighbours of lower types. Returns (nlist [..., nnei], counts [..., ntypes])."""
    dev = dr.device
    cnt = torch.round(within.to(onehot.dtype) @ onehot[..., : len(req.sel)]).long()  # [nf, ch, ntypes]
    sel = _on(req.sel, dev)
    # the slots reach rank sum(cnt[:-1]) + min(cnt[-1], sel[-1]): at most nnei unless a block overflows,
    # which raises later unless truncating (then one more sync, per chunk)
    k = int((cnt[..., :-1].sum(-1) + torch.minimum(cnt[..., -1], sel[-1])).amax().tolist()) if truncate else req.nnei
    k = max(1, min(k, dr.shape[-1]))
    key = dr.double() + ctype[:, None, :].double() * big
    _, idx = torch.topk(key, k, dim=-1, largest=False, sorted=True)
    slot_t = torch.cat([torch.full((n,), t, device=dev) for t, n in enumerate(req.sel)])
    slot_p = torch.arange(req.nnei, device=dev) - (torch.cumsum(sel, 0) - sel)[slot_t]
    start = (cnt.cumsum(-1) - cnt)[..., slot_t]  # [nf, ch, nnei]
    nl = torch.where(slot_p < cnt[..., slot_t], idx.gather(-1, (start + slot_p).clamp(max=k - 1)), -1)
    return nl, cnt


def _lists(cand: _Candidates, requests: list[NlistRequest], truncate: bool, chunk: int):
    """Exact distances centre -> candidate (cdist without the matmul trick) for chunks of centres;
    per request its blocks by topk. Returns per request (nlist [nf, nloc, nnei], counts [nf, nloc, nblocks])."""
    nf, nloc, _ = cand.qpos.shape
    nc = cand.cpos.shape[1]
    dev = cand.qpos.device
    rcut = max(r.rcut for r in requests)
    ntypes = max((len(r.sel) for r in requests if not r.mixed), default=0)
    onehot = (cand.ctype[..., None] == torch.arange(ntypes, device=dev)).to(cand.qpos.dtype)  # [nf, nc, ntypes]
    mixed = [r for r, req in enumerate(requests) if req.mixed]
    base = max(mixed, key=lambda r: (requests[r].rcut, requests[r].sel[0]), default=None)  # one topk serves the
    derived = {r for r in mixed if r != base and requests[r].rcut <= requests[base].rcut  # smaller mixed lists
               and requests[r].sel[0] <= requests[base].sel[0]}
    step = max(1, chunk // max(1, nf * nc))
    parts: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in requests]
    for i0 in range(0, nloc, step):
        i1 = min(nloc, i0 + step)
        d = torch.cdist(cand.qpos[:, i0:i1], cand.cpos, compute_mode="donot_use_mm_for_euclid_dist")  # [nf, ch, nc]
        ar = torch.arange(i1 - i0, device=dev)
        d[:, ar, i0 + ar] = torch.inf  # an atom is not its own neighbour (its other images are)
        order = ([base] if base is not None else []) + [r for r in range(len(requests)) if r != base]
        base_nl = None  # this chunk's base list: built first, the derived lists are its prefixes
        for r in order:
            req = requests[r]
            within = d < req.rcut
            if r in derived:
                parts[r].append(_mixed_prefix(base_nl, within, req.sel[0]))
                continue
            dr = d.masked_fill(~within, torch.inf)
            if req.mixed:
                nl, cnt = _mixed_block(dr, within, req.sel[0])
                if r == base:
                    base_nl = nl
                parts[r].append((nl, cnt))
            else:
                parts[r].append(_typed_blocks(dr, within, cand.ctype, onehot, req, truncate, 2.0 * rcut + 1.0))
    return [(torch.cat([p[0] for p in ps], dim=1), torch.cat([p[1] for p in ps], dim=1)) for ps in parts]


@torch.no_grad()
def batch_graph_torch(coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, pbc: torch.Tensor,
                      requests: list[NlistRequest], truncate: bool = False, chunk: int | None = None) -> BatchGraph:
    """batch_graph in torch on coord's device, vectorised over the batch (any padding layout).

    Candidates (_candidates), distances and topk per block (_lists), then only the ghosts some list
    uses are kept, in candidate order. Device -> host transfers, for data-dependent sizes only: the
    image range (3 ints), the number of ghost candidates (1 int), the number of ghosts kept together
    with the overflow flag (2 ints); truncate=True with a typed list adds one (1 int) per chunk.
    Cost: nloc x (nloc + ghost candidates) distances per frame (no cell list), about `chunk` entries
    at a time (default 2**24 on CUDA, 2**22 elsewhere). Distances are in coord's dtype: in float32,
    neighbours closer than float32 round-off to each other (or to rcut) may swap (or drop)."""
    dev = coord.device
    nf, nloc = atype.shape
    chunk = chunk or (1 << 24 if dev.type == "cuda" else 1 << 22)
    cand = _candidates(coord, atype, box, pbc, max(r.rcut for r in requests))
    ncand = cand.gatom.shape[1]
    found = _lists(cand, requests, truncate, chunk)
    nlists = [n for n, _ in found]
    over = [(c > _on(req.sel, dev)).any(dim=-1) for (_, c), req in zip(found, requests)]  # [nf, nloc] each
    used = torch.zeros(nf, ncand + 1, dtype=torch.bool, device=dev)  # ghost candidates some list uses
    for n in nlists:
        g = n.reshape(nf, -1) - nloc
        used.scatter_(1, torch.where(g >= 0, g, ncand), True)
    used = used[:, :ncand]
    nghost, flag = torch.stack([used.sum(dim=1).amax() if ncand else torch.zeros((), dtype=torch.long, device=dev),
                                torch.stack([o.any() for o in over]).any().long()]).tolist()  # sync 3
    if flag and not truncate:  # the first frame with an overflow, then its first request and atom (as the reference)
        f = int(torch.stack([o.any(dim=1) for o in over]).any(dim=0).nonzero()[0, 0].tolist())
        r = next(r for r, o in enumerate(over) if bool(o[f].any()))
        i = int(over[r][f].nonzero()[0, 0].tolist())
        raise NeighborOverflow(i, found[r][1][f, i].cpu().numpy(), requests[r].sel, frame=f)
    pick = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :nghost]  # kept ghosts, in order
    kept = used.gather(1, pick)
    mapping = torch.cat([torch.arange(nloc, device=dev).expand(nf, nloc), torch.where(kept, cand.gatom.gather(1, pick), 0)], 1)
    gshift = torch.where(kept[..., None], cand.gshift.gather(1, pick[..., None].expand(-1, -1, 3)), 0)
    shift = torch.cat([-cand.wrap, gshift], dim=1) + 0.0  # + 0.0: no -0.0
    newidx = torch.cumsum(used, dim=1) - 1 + nloc  # ghost candidate -> its extended index
    out = []
    for n in nlists:
        if ncand:
            n = torch.where(n >= nloc, newidx.gather(1, (n - nloc).clamp(min=0).reshape(nf, -1)).reshape(n.shape), n)
        out.append(n)
    return BatchGraph(mapping, shift, out)


def batch_graph_reference(coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, pbc: torch.Tensor,
                          requests: list[NlistRequest], truncate: bool = False) -> BatchGraph:
    """batch_graph by build_graph (cKDTree) frame by frame on the host; the reference for the tests."""
    nf, nloc = atype.shape
    graphs = []
    for f in range(nf):
        real = (atype[f] >= 0).cpu().numpy()
        n = int(real.sum())
        xyz = coord[f, :n].detach().cpu().double().numpy()
        cell = box[f].detach().cpu().double().numpy() if (box is not None and bool(pbc[f])) else None
        try:
            graphs.append(build_graph(xyz, cell, atype[f, :n].cpu().numpy(), requests, truncate=truncate))
        except NeighborOverflow as e:
            raise NeighborOverflow(e.atom, e.counts, e.sel, frame=f) from None
    nall = nloc + max(g.nall - int((atype[f] >= 0).sum()) for f, g in enumerate(graphs))
    mapping = np.tile(np.arange(nall), (nf, 1))
    mapping[:, nloc:] = 0
    shift = np.zeros((nf, nall, 3))
    nlists = [np.full((nf, nloc, r.nnei), -1, dtype=np.int64) for r in requests]
    for f, g in enumerate(graphs):
        n = int((atype[f] >= 0).sum())
        ng = g.nall - n
        shift[f, :n] = g.shift[:n]
        mapping[f, nloc:nloc + ng] = g.mapping[n:]
        shift[f, nloc:nloc + ng] = g.shift[n:]
        for r, nl in enumerate(g.nlists):
            nlists[r][f, :n] = np.where(nl >= n, nl - n + nloc, nl)
    dev = coord.device
    return BatchGraph(torch.as_tensor(mapping, device=dev), torch.as_tensor(shift, dtype=coord.dtype, device=dev),
                      [torch.as_tensor(n, device=dev) for n in nlists])


def batch_graph(coord: torch.Tensor, atype: torch.Tensor, box: torch.Tensor | None, pbc: torch.Tensor,
                requests: list[NlistRequest], truncate: bool = False, method: str = "auto") -> BatchGraph:
    """Neighbour lists of a padded batch, as tensors on coord's device.

    coord [nf, nloc, 3]; atype [nf, nloc] (-1 = padding; real atoms first in each frame, as collate pads);
    box [nf, 3, 3] (rows are cell vectors) or None; pbc [nf] bool (False rows are non-periodic frames,
    their box rows are ignored). More neighbours than sel raises NeighborOverflow with `frame` set,
    unless truncate=True (keeps the nearest).

    method: "torch" (batch_graph_torch, on coord's device), "numpy" (cKDTree per frame on the host,
    batch_graph_reference) or "auto": torch on CUDA, numpy on the CPU, where cKDTree measured faster
    (bench/nlist_speed.py, bench/README.md)."""
    if method == "auto":
        method = "numpy" if coord.device.type == "cpu" else "torch"
    if method == "torch":
        return batch_graph_torch(coord, atype, box, pbc, requests, truncate)
    if method == "numpy":
        return batch_graph_reference(coord, atype, box, pbc, requests, truncate)
    raise ValueError(f"batch_graph: method must be 'auto', 'torch' or 'numpy', got {method!r}")
