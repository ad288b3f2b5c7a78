"""`lamflow inspect MODEL [--type-embedding-pca OUT.png] [--coverage OUT.png]`.

Prints what a checkpoint holds: kind, type map, branches (multi-task), the descriptor and its
sizes, and the number of parameters of each part. `--type-embedding-pca` plots the learned type
embedding of every element on its first two principal components (elements that behave alike sit
together, DPA-2 paper Fig. 2); `--coverage` draws the periodic table with the elements the model
was trained on (its checkpoint's `trained_elements`) apart from those only in its type map.
Works for energy, multi-task and compressed checkpoints.
"""

from __future__ import annotations

from pathlib import Path

SIZE_KEYS = ("rcut", "sel", "nsel", "neuron", "axis_neuron", "tebd_dim", "attn", "attn_layer", "type_one_side", "nlayers",
             "g1_dim", "g2_dim")


def register(sub) -> None:
    p = sub.add_parser("inspect", help="type map, branches, descriptor and parameter counts of a model; optional plots")
    p.add_argument("model", type=Path, help="model checkpoint (energy or multi-task)")
    p.add_argument("--type-embedding-pca", type=Path, metavar="OUT.png", help="PCA of the learned type embeddings")
    p.add_argument("--coverage", type=Path, metavar="OUT.png",
                   help="periodic table: elements trained on vs only in the type map")
    p.set_defaults(func=run)


def run(args) -> int:
    from lamflow.model.data.coverage import trained_elements
    from lamflow.model.io.checkpoint import build_from_payload, read_checkpoint

    payload = read_checkpoint(args.model)
    model = build_from_payload(payload, str(args.model))
    trained = trained_elements(payload)
    for line in summary(model, str(args.model), trained, payload.get("trained_elements_by_branch")):
        print(line)
    if args.type_embedding_pca:
        type_embedding_pca(model, args.type_embedding_pca, str(args.model))
        print(f"wrote {args.type_embedding_pca}")
    if args.coverage:
        tm = elements(model)
        title = f"{args.model.name}: {len(tm)} elements in the type map" + (
            ", trained-on elements not recorded" if trained is None else f", {len([e for e in tm if e in trained])} trained on")
        coverage_plot(tm, args.coverage, title=title, trained=trained)
        print(f"wrote {args.coverage}")
    return 0


def trained_line(type_map: list[str], trained: list[str] | None) -> str:
    if trained is None:
        return "trained on: not recorded in this checkpoint (written before lamflow recorded it)"
    on = [e for e in type_map if e in trained]
    only = [e for e in type_map if e not in trained]
    return f"trained on ({len(on)}): {' '.join(on)}" + (f"  (in the type map only, untrained: {' '.join(only)})" if only else "")


def elements(model) -> list[str]:
    """The model's real elements (the denoise MASK pseudo-type left out)."""
    from lamflow.model.nn.config import MASK

    return [e for e in model.type_map if e != MASK]


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _sizes(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _sizes(v, f"{prefix}{k}.")
        elif k in SIZE_KEYS:
            out.append(f"{prefix}{k} {v}")
    return out


def descriptor_config(model):
    """The descriptor's config; a compressed model keeps it in the config of the model it was made from."""
    cfg = model.cfg
    return cfg.model.descriptor if model.kind == "compressed" else cfg.descriptor


def summary(model, source: str, trained: list[str] | None = None, by_branch: dict | None = None) -> list[str]:
    """The printed lines; `trained`: elements of the training data (checkpoint's trained_elements),
    `by_branch`: those of each branch of a multi-task model."""
    from lamflow.model.nn.config import MASK

    kind = model.kind
    tm = list(model.type_map)
    lines = [f"model: {source}  (kind {kind}, {model.cfg.dtype_name})",
             f"type map ({len(elements(model))}): {' '.join(elements(model))}"
             + ("  (+ MASK token for denoising)" if MASK in tm else "")]
    lines.append(trained_line(elements(model), trained))
    if by_branch:
        lines.append("  by branch: " + "; ".join(f"{n}: {' '.join(e)}" for n, e in by_branch.items()))
    branches = getattr(model.cfg, "branches", None)
    if branches:
        parts = [f"{n} ({h.task}: {' '.join(h.type_map)})" for n, h in branches.items()]
        lines.append(f"branches ({len(branches)}): " + "; ".join(parts))
    desc = model.descriptor
    dcfg = descriptor_config(model)
    lines.append(f"descriptor: {dcfg.type}  " + "  ".join(_sizes(dcfg.model_dump())) + f"  dim_out {desc.dim_out}")
    if kind == "compressed":
        c = model.cfg
        rows, ntab, ncoef = desc.coef.shape[1], desc.coef.shape[0], desc.coef.shape[2]
        lines.append(f"compressed: {len(c.tables)} tables, {rows} rows of {ntab} x {ncoef} "
                     f"coefficients (stride {c.stride}, extrapolate {c.extrapolate}, min_nbor_dist {c.min_nbor_dist:.4f} A)")
    lines.append("parameters:")
    rows = [("descriptor", _count(desc))] + [(f"  {n}", _count(m)) for n, m in desc.named_children() if _count(m)]
    heads = getattr(model, "heads", None)
    if heads is not None:
        rows += [(f"head {n} ({branches[n].task})", _count(m)) for n, m in heads.items()]
    else:
        rows += [(n, _count(m)) for n, m in model.named_children() if n != "descriptor"]
    if kind == "compressed":  # the tables are buffers, not parameters
        rows.insert(1, ("  tables (coefficients)", desc.coef.numel()))
    rows.append(("total", _count(model) + (desc.coef.numel() if kind == "compressed" else 0)))
    w = max(len(r[0]) for r in rows)
    lines += [f"  {name.ljust(w)}  {n:>10,d}" for name, n in rows]
    return lines


def type_embedding_table(model, source: str):
    """[n_elements, tebd_dim] learned embeddings (numpy) of the model's elements."""
    from lamflow.model.errors import ConfigError
    from lamflow.model.nn.descriptor import TypeEmbedding

    found = [m for m in model.descriptor.modules() if isinstance(m, TypeEmbedding)]
    if not found:
        raise ConfigError(f"{source}: descriptor {descriptor_config(model).type} has no type embedding (one network per "
                          "element); --type-embedding-pca needs a mixed-type descriptor such as se_atten or dpa2")
    tm = list(model.type_map)
    idx = [tm.index(e) for e in elements(model)]
    return found[0].table().detach().double().cpu().numpy()[idx]


def type_embedding_pca(model, png: Path, source: str = "model") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    emb = type_embedding_table(model, source)  # [n, d]
    names = elements(model)
    x = emb - emb.mean(0)
    _, s, vt = np.linalg.svd(x, full_matrices=False)
    k = min(2, vt.shape[0])
    proj = np.zeros((len(names), 2))
    proj[:, :k] = x @ vt[:k].T
    var = s**2 / max((s**2).sum(), 1e-300)
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.scatter(proj[:, 0], proj[:, 1], s=30)
    for (px, py), name in zip(proj, names):
        ax.annotate(name, (px, py), textcoords="offset points", xytext=(4, 4), fontsize=10)
    ax.set_xlabel(f"PC1 ({100 * var[0]:.0f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * (var[1] if len(var) > 1 else 0):.0f}% of variance)")
    ax.set_title(f"type embeddings ({descriptor_config(model).type}, dim {emb.shape[1]})")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def table_position(z: int) -> tuple[int, int]:
    """(row, column) of element z in the 18-column periodic table; lanthanides in row 9,
    actinides in row 10 (drawn below a gap)."""
    if z <= 2:
        return 1, 1 if z == 1 else 18
    for start, end, row in ((3, 10, 2), (11, 18, 3)):
        if start <= z <= end:
            return row, z - start + 1 if z < start + 2 else z - end + 18
    if z <= 54:
        row, first = (4, 19) if z <= 36 else (5, 37)
        return row, z - first + 1
    first, row = (55, 6) if z <= 86 else (87, 7)
    if z < first + 2:
        return row, z - first + 1
    if z <= first + 16:  # La..Lu, Ac..Lr
        return row + 3, z - first - 2 + 3
    return row, z - first - 14 + 1


def coverage_plot(covered: list[str], png: Path, title: str = "element coverage", trained: list[str] | None = None) -> Path:
    """Periodic table: `covered` (the type map) highlighted; with `trained`, elements trained on in
    orange and those only in the type map in pale yellow, hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ase.data import chemical_symbols
    from matplotlib.patches import Rectangle

    fig, ax = plt.subplots(figsize=(11, 6))
    for z in range(1, 119):
        sym = chemical_symbols[z]
        row, col = table_position(z)
        y = -(row + (0.5 if row > 7 else 0))
        on = sym in covered
        untrained = on and trained is not None and sym not in trained
        face = "0.92" if not on else ("#fff3b0" if untrained else "tab:orange")
        ax.add_patch(Rectangle((col, y), 0.92, 0.92, facecolor=face, edgecolor="0.5", lw=0.5, hatch="//" if untrained else None))
        ax.text(col + 0.46, y + 0.46, sym, ha="center", va="center", fontsize=9, weight="bold" if on else "normal",
                color="black" if on else "0.55")
    if trained is not None:
        ax.legend(handles=[Rectangle((0, 0), 1, 1, facecolor="tab:orange", edgecolor="0.5", label="trained on"),
                           Rectangle((0, 0), 1, 1, facecolor="#fff3b0", edgecolor="0.5", hatch="//",
                                     label="in the type map only (untrained)")],
                  loc="upper center", bbox_to_anchor=(0.45, 0.99), fontsize=9, frameon=False)
    ax.set_xlim(0.8, 19.1)
    ax.set_ylim(-11.2, 0.1)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png
