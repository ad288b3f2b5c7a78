"""se_atten: DPA-1 (Zhang et al., npj Comput. Mater. 10, 94 (2024)); se_atten_v2 = strip mode.

One mixed-type neighbour list of N_c = sel slots sorted by distance; type embedding A_t (base.py).
Embedding of each neighbour (one shared net N_e):
    concat: G0_ij = N_e([R^_ij[0], A_{t_j}] (+ [A_{t_i}] unless type_one_side))
    strip : G0_ij = N_s(R^_ij[0]) * (N_t([A_{t_j}(, A_{t_i})]) * sw_ij) + N_s(R^_ij[0])   (sw only if smooth)
Gated self-attention over the neighbours of atom i, l = 1..attn_layer (deepmd-kit's
GatedAttentionLayer, one head, post-LayerNorm):
    Q, K, V = split(G W_in + b);   if normalize: row-wise L2-normalise Q, K, V
    S_jk    = (Q_j . K_k) * scale,  scale = temperature or (attn * scaling_factor)^-1/2
    smooth:  S <- (S + 20) sw_j sw_k - 20;  P = softmax_k(S);  P <- P sw_j sw_k
    else:    S[:, empty k] = -inf;          P = softmax_k(S)
    P[empty j, :] = 0;   attn_mask: P_jj = 0;   attn_dotr: P <- P * (r^_j . r^_k)
    G <- LayerNorm(G + (P V) W_out + b)
with r^_j the unit vector of R^_ij[1:4]. Then as se_e2_a: T_i = (1/N_c) sum_j R^_ij^T G_ij,
D_i = T_i^T T_i[:, :M2] flattened, and [D_i, A_{t_i}] if concat_output_tebd.
The "+20 shift" smoothing makes attention weights of a neighbour vanish continuously as it
reaches rcut, so the energy is continuous there (`smooth_type_embedding`; see config.py).
Empty slots use the padding type embedding (zero), never another atom's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lamflow.model.data.batch import auto_sel
from lamflow.model.data.neighbor import NlistRequest
from lamflow.model.nn.descriptor.base import Descriptor, DescriptorOutput, EnvMatBlock, TypeEmbedding
from lamflow.model.nn.descriptor_config import SeAttenConfig, dtype_name
from lamflow.model.nn.env_mat import gather_neighbors
from lamflow.model.nn.network import DTYPES, EmbeddingNet, Layer, make_generator

ATTN_SHIFT = 20.0


class GatedAttentionLayer(nn.Module):
    def __init__(self, m1: int, hidden: int, dotr: bool, do_mask: bool, scaling_factor: float, normalize: bool,
                 temperature: float | None, smooth: bool, ln_eps: float, trainable_ln: bool, dtype, generator):
        super().__init__()
        self.hidden, self.dotr, self.do_mask, self.normalize, self.smooth = hidden, dotr, do_mask, normalize, smooth
        self.scale = temperature if temperature is not None else (hidden * scaling_factor) ** -0.5
        self.in_proj = Layer(m1, 3 * hidden, None, dtype=dtype, generator=generator)
        self.out_proj = Layer(hidden, m1, None, dtype=dtype, generator=generator)
        self.norm = nn.LayerNorm(m1, eps=ln_eps, dtype=dtype)
        self.norm.requires_grad_(trainable_ln)

    def forward(self, G: Tensor, mask: Tensor, sw: Tensor, rhat: Tensor) -> Tensor:
        """G [B, nnei, M1]; mask, sw [B, nnei]; rhat [B, nnei, 3]."""
        q, k, v = self.in_proj(G).split(self.hidden, dim=-1)  # each [B, nnei, attn]
        if self.normalize:
            q, k, v = F.normalize(q, dim=-1), F.normalize(k, dim=-1), F.normalize(v, dim=-1)
        S = (q * self.scale) @ k.transpose(-1, -2)  # [B, nnei, nnei]
        if self.smooth:
            sw2 = sw[:, :, None] * sw[:, None, :]
            S = (S + ATTN_SHIFT) * sw2 - ATTN_SHIFT
        else:
            S = S.masked_fill(~mask[:, None, :], float("-inf"))
        P = torch.softmax(S, dim=-1)
        P = P.masked_fill(~mask[:, :, None], 0.0)
        if self.smooth:
            P = P * sw2
        if self.do_mask:
            P = P * (1.0 - torch.eye(P.shape[-1], dtype=P.dtype, device=P.device))
        if self.dotr:
            P = P * (rhat @ rhat.transpose(-1, -2))
        return self.norm(G + self.out_proj(P @ v))


class SeAtten(Descriptor, config=SeAttenConfig):

    def __init__(self, cfg: SeAttenConfig, ntypes: int):
        super().__init__()
        if not isinstance(cfg.sel, int):
            raise ValueError(f"se_atten sel must be resolved to an int before building, got {cfg.sel!r}")
        self.cfg, self.ntypes, self.nnei = cfg, ntypes, cfg.sel
        dtype = DTYPES[dtype_name(cfg.precision)]
        g = make_generator(cfg.seed)
        self.strip = cfg.strip
        self.smooth = cfg.smooth_type_embedding
        self.type_embedding = TypeEmbedding(ntypes, cfg.tebd_dim, use_bias=cfg.use_tebd_bias, dtype=dtype, generator=g)
        self.env = EnvMatBlock(cfg.rcut, cfg.rcut_smth, self.nnei, ntypes, dtype, cfg.env_protection, cfg.set_davg_zero)
        ntebd = cfg.tebd_dim * (1 if cfg.type_one_side else 2)
        if self.strip:
            self.net = EmbeddingNet(1, cfg.neuron, cfg.activation_function, cfg.resnet_dt, dtype, g)
            self.net_strip = EmbeddingNet(ntebd, cfg.neuron, cfg.activation_function, cfg.resnet_dt, dtype, g)
        else:
            self.net = EmbeddingNet(1 + ntebd, cfg.neuron, cfg.activation_function, cfg.resnet_dt, dtype, g)
        self.m1, self.m2 = cfg.neuron[-1], cfg.axis_neuron
        self.attention = nn.ModuleList(
            GatedAttentionLayer(self.m1, cfg.attn, cfg.attn_dotr, cfg.attn_mask, cfg.scaling_factor, cfg.normalize,
                                cfg.temperature, self.smooth, cfg.ln_eps, cfg.trainable_ln, dtype, g)
            for _ in range(cfg.attn_layer)
        )
        self.dim_out = self.m1 * self.m2 + (cfg.tebd_dim if cfg.concat_output_tebd else 0)
        if not cfg.trainable:
            self.requires_grad_(False)

    def nlist_requests(self) -> list[NlistRequest]:
        return [NlistRequest(self.cfg.rcut, (self.nnei,), mixed=True)]

    def embed(self, R: Tensor, sw: Tensor, tebd_i: Tensor, tebd_j: Tensor) -> Tensor:
        """G0 [nf, nloc, nnei, M1] from the radial column and the type embeddings."""
        s = R[..., :1]
        pair = tebd_j if self.cfg.type_one_side else torch.cat([tebd_j, tebd_i.unsqueeze(2).expand_as(tebd_j)], -1)
        if not self.strip:
            return self.net(torch.cat([s, pair], dim=-1))
        Gs = self.net(s)
        Gt = self.net_strip(pair)
        if self.smooth:
            Gt = Gt * sw[..., None]
        return Gs * Gt + Gs

    def forward(self, coord_ext: Tensor, atype_ext: Tensor, nlists: list[Tensor], mapping: Tensor | None = None) -> DescriptorOutput:
        nlist = nlists[0]
        nf, nloc, nnei = nlist.shape
        atype = atype_ext[:, :nloc]
        mask = nlist >= 0
        R, diff, sw = self.env(coord_ext, atype, nlist)  # [nf, nloc, nnei, 4]
        tebd_ext = self.type_embedding(atype_ext)  # [nf, nall, tebd]
        tebd_i = tebd_ext[:, :nloc]
        pad = torch.zeros_like(tebd_i[:, :1, None, :])
        tebd_j = torch.where(mask[..., None], gather_neighbors(tebd_ext, nlist), pad)  # [nf, nloc, nnei, tebd]
        G = self.embed(R, sw, tebd_i, tebd_j)  # [nf, nloc, nnei, M1]
        if self.attention:
            B = nf * nloc
            rhat = F.normalize(R[..., 1:4], dim=-1).reshape(B, nnei, 3)
            Gf = G.reshape(B, nnei, self.m1)
            for layer in self.attention:
                Gf = layer(Gf, mask.reshape(B, nnei), sw.reshape(B, nnei), rhat)
            G = Gf.reshape(nf, nloc, nnei, self.m1)
        T = R.transpose(-1, -2) @ G / self.nnei  # [nf, nloc, 4, M1]
        D = (T.transpose(-1, -2) @ T[..., : self.m2]).flatten(-2)  # [nf, nloc, M1 * M2]
        if self.cfg.concat_output_tebd:
            D = torch.cat([D, tebd_i], dim=-1)
        return DescriptorOutput(D, G, diff, sw, nlist)

    @staticmethod
    def resolve_sel(cfg: SeAttenConfig, counter):
        """sel "auto"/"auto:r" -> max total neighbour count * r; a list is summed (mixed types)."""
        if isinstance(cfg.sel, str):
            ratio = 1.1 if cfg.sel == "auto" else float(cfg.sel.split(":")[1])
            _, total = counter(cfg.rcut)
            return cfg.model_copy(update={"sel": auto_sel([total], ratio)[0]})
        if isinstance(cfg.sel, list):
            return cfg.model_copy(update={"sel": int(sum(cfg.sel))})
        return cfg

    def set_stats(self, samples, protect: float = 1e-2) -> None:
        self.env.set_stats(samples, protect)
