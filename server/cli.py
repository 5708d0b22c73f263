"""``rpe`` sub-commands of the coordinator: registry, blob-key, compose, audit, experiment.

``register(subparsers)`` adds them to the top-level parser that ``deploy.cli`` builds. Heavy modules
(torch, the registry, Chroma) are imported inside each command so that ``rpe --help`` stays instant;
every lazy import stays inside ``server`` or ``common`` (the layer rule, checked by import-linter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from common.adapters.normalise import DEFAULT_UPDATE_NORM, UPDATE_NORM_HELP, UPDATE_NORMS
from common.cli_base import CliError, print_table
from server.auditcli import register as register_audit
from server.nearness import DEFAULT_FAR_RATIO


def _load_z(path: str) -> Any:
    """One z vector from a ``.npy`` file, its header checked before any data is read (bounded size,
    numeric dtype, a vector), so a forged header or a FIFO is a clear error, never a hang."""
    from common.files.safeio import UnsafeInputError, load_npy_vector

    p = Path(path)
    if not p.exists():
        raise CliError(f"embedding file {p} does not exist; create one with `rpe embed --out {p}`")
    try:
        return load_npy_vector(p, max_values=MAX_Z_VALUES)
    except UnsafeInputError as exc:
        raise CliError(f"{exc}; write one vector with numpy.save or `rpe embed`") from None


#: the largest z a command reads (far above any hidden size; a forged .npy header claims more)
MAX_Z_VALUES = 1 << 20


_BLOB_KEY_HELP = (
    "AES-256-GCM key file of an encrypted registry (`rpe blob-key new FILE`; default: "
    "$RPE_BLOB_KEY_FILE, else $RPE_BLOB_KEY); needed to add or read adapters, not to list"
)


def _blob_key(args: argparse.Namespace) -> Any:
    """The key named by --blob-key-file, else the environment's (None: none configured)."""
    from server.registry.blobcrypt import load_blob_key

    return load_blob_key(getattr(args, "blob_key_file", None) or None)


def _open_registry(args: argparse.Namespace, read_only: bool = False) -> Any:
    """The registry ``--registry`` names; ``read_only`` for commands that only look (no lock, so they
    work while the ServerApp holds it, and nothing on disk is touched)."""
    from server.registry import Registry

    return Registry(args.registry, blob_key=_blob_key(args), read_only=read_only)


# ---------------------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------------------


def cmd_registry_init(args: argparse.Namespace) -> None:
    from common.models import fingerprint, linear_module_shapes, load_base_model, resolve_model_dir
    from server.registry import Registry

    model_dir = resolve_model_dir(args.base)
    model, _ = load_base_model(model_dir)
    if args.representation == "minilm":
        dim, representation = 384, "minilm"
    else:
        dim, representation = int(model.config.hidden_size), f"hidden-mean:layer={args.layer}"
    reg = Registry.init(
        args.registry,
        base_fingerprint=fingerprint(model_dir),
        module_shapes=linear_module_shapes(model),
        embedding_dim=dim,
        representation=representation,
        chroma_host=args.chroma_host,
        chroma_port=args.chroma_port,
        base_name=str(args.base),
        blob_key=_blob_key(args),
    )
    enc = reg.blob_encryption
    print(
        f"registry {args.registry}: base {fingerprint(model_dir)[:19]}…, z dim {dim} ({representation})"
        + (f", blobs encrypted ({enc['alg']}, key {enc['key_id']})" if enc else "")
    )
    reg.close()


def cmd_blob_key_new(args: argparse.Namespace) -> None:
    from server.registry.blobcrypt import KEY_FILE_ENV, new_key_file

    key = new_key_file(args.file)
    print(
        f"wrote blob key {key.key_id} to {args.file} (mode 0600; keep a backup: blobs encrypted with it are "
        "unreadable without it)"
    )
    print(
        f"use it: rpe registry init --registry DIR --blob-key-file {args.file}; then pass --blob-key-file "
        f"{args.file} (or set {KEY_FILE_ENV}={args.file}) to every rpe command on that registry, and run config "
        f'blob-key-file="{args.file}" for the ServerApp'
    )


def _check_ids(args: argparse.Namespace) -> None:
    """The site id as the allow-list checks it (it names files: no ``../../x``), and the task and
    modality as the registry's metadata check does (``common.files.safeio.check_name``, the check
    ``server/registry/validation.py`` runs), before anything is opened or read."""
    from common.files.safeio import UnsafeInputError, check_name
    from common.trust.signing import check_site_id

    try:
        check_site_id(args.site)
    except ValueError as exc:
        raise CliError(f"--site: {exc}") from None
    for flag in ("task", "modality"):
        try:
            check_name(getattr(args, flag), f"--{flag}")
        except UnsafeInputError as exc:
            raise CliError(str(exc)) from None


def cmd_registry_add(args: argparse.Namespace) -> None:
    from common.adapters import load_peft_adapter
    from server.registry import AdapterMeta

    _check_ids(args)
    reg = _open_registry(args)
    try:
        adapter = load_peft_adapter(args.adapter)
        z = _load_z(args.embedding)
        base = args.base_fingerprint or next(iter(reg.bases))
        meta = AdapterMeta(
            site=args.site, task=args.task, modality=args.modality, base_fingerprint=base, sample_count=args.samples
        )
        rec = reg.add(adapter, z, meta)
    finally:
        reg.close()
    print(json.dumps(rec.to_dict(), indent=2) if args.json else f"added {rec.id} ({rec.bytes} bytes)")


def cmd_registry_ls(args: argparse.Namespace) -> None:
    reg = _open_registry(args, read_only=True)
    try:
        records = reg.list(task=args.task, modality=args.modality, site=args.site)
    finally:
        reg.close()
    if args.json:
        print(json.dumps([r.to_dict() for r in records], indent=2))
        return
    rows = [
        {
            "id": r.id,
            "site": r.meta.site,
            "task": r.meta.task,
            "modality": r.meta.modality,
            "rank": r.meta.rank,
            "samples": r.meta.sample_count,
            "bytes": r.bytes,
            "created": r.meta.created_at,
        }
        for r in records
    ]
    print_table(rows, ["id", "site", "task", "modality", "rank", "samples", "bytes", "created"])


def cmd_registry_show(args: argparse.Namespace) -> None:
    reg = _open_registry(args, read_only=True)
    try:
        rec = reg.get(args.id)
    finally:
        reg.close()
    print(json.dumps(rec.to_dict(with_z=args.z), indent=2))


def cmd_registry_rm(args: argparse.Namespace) -> None:
    reg = _open_registry(args)
    try:
        rec = reg.remove(args.id, reason=args.reason)
    finally:
        reg.close()
    print(f"removed {rec.id} (blob {rec.blob_sha256[:12]}… kept for the audit trail; `gc` deletes it)")


# ---------------------------------------------------------------------------------------------
# coordinator: composition
# ---------------------------------------------------------------------------------------------


def cmd_compose(args: argparse.Namespace) -> None:
    from server.composer import compose_for_target
    from server.nearness import FarRatioError, check_far_ratio
    from server.nearness import summary as nearness_summary

    try:  # before any work: NaN or inf never warns and cannot be audited; below 0 would switch it off
        check_far_ratio(args.far_ratio)
    except FarRatioError as exc:
        raise CliError(f"--far-ratio: {exc}") from None

    z = _load_z(args.embedding)
    params: dict[str, float] = {}
    if args.lam1 is not None:
        params["lam1"] = args.lam1
    if args.lam2 is not None:
        params["lam2"] = args.lam2
    if args.max_l1 is not None:
        if args.strategy not in ("lin", "lin-l1"):
            raise ValueError(f"--max-l1 bounds the weights of lin and lin-l1, not {args.strategy!r}")
        params["max_l1"] = args.max_l1
    reg = _open_registry(args)
    dims = getattr(z, "shape", ())
    if len(dims) == 1 and dims[0] != reg.embedding_dim:  # a z of another family or model: say which
        reg.close()
        raise CliError(
            f"--embedding {args.embedding}: a z of {dims[0]} values, but {args.registry} holds z of "
            f"{reg.embedding_dim} ({reg.representation!r}); compute the target's z with `rpe embed` for this "
            "registry's family and base model (a segmentation registry: --family segmentation --images DIR)"
        )
    try:
        res = compose_for_target(
            reg,
            z,
            strategy=args.strategy,
            k=args.k,
            exclude_site=args.exclude_site,
            task=args.task,
            max_rank=args.max_rank,
            strategy_params=params or None,
            out_dir=args.out,
            target=args.target,
            force=args.force,
            one_per_site=not args.several_per_site,
            far_ratio=args.far_ratio,
            update_norm=args.update_norm,
        )
    finally:
        reg.close()
    rows = [{"id": i, "distance": float(d), "weight": float(w)} for i, d, w in zip(res.ids, res.distances, res.weights)]
    if args.json:
        print(
            json.dumps(
                {
                    "strategy": args.strategy,
                    "retrieved": rows,
                    "out": str(res.out_dir),
                    "output_sha256": res.output_sha256,
                    "nearness": res.nearness,  # server/nearness.py: the "nothing close enough" check
                    "normalisation": res.normalisation,  # common/adapters/normalise.py: update-norm, scales c_i
                },
                indent=2,
            )
        )
        return
    print_table(rows, ["id", "distance", "weight"])
    print(f"composed adapter written to {res.out_dir} (sha256 {res.output_sha256[:16]}…)")
    if res.normalisation.get("scales"):  # common/adapters/normalise.py: the composition is Σ w_i c_i δ_i
        norm = res.normalisation
        scales = ", ".join(f"{c:.4g}" for c in norm["scales"])
        print(f"update-norm {norm['mode']}: scales c_i {scales} (reference norm {norm['reference']:.4g})")
    print(nearness_summary(res.nearness))  # warned or not, the adapter is written: the operator decides


# ---------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------


def cmd_experiment(args: argparse.Namespace) -> None:
    from server.experiment import main as experiment_main

    experiment_main(profile=args.profile, out_dir=args.out, groups=args.groups)


def register(sub: Any) -> None:
    """Add the coordinator's commands to the top-level ``rpe`` subparsers."""
    reg = sub.add_parser(
        "registry",
        help="create, fill and inspect a LoRA registry",
        description="The coordinator's LoRA registry (records + blobs + Chroma index).",
    )
    rsub = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser(
        "init",
        help="create a registry bound to one base model",
        description="Create a registry for adapters of BASE (its fingerprint and module "
        "shapes are recorded so submissions can be validated without the model).",
    )
    r.add_argument("--registry", required=True, help="registry directory to create")
    r.add_argument(
        "--base",
        default="smollm2-135m-instruct",
        help="base model: a local model directory or 'smollm2-135m-instruct' (default)",
    )
    r.add_argument(
        "--representation",
        choices=["hidden-mean", "minilm"],
        default="hidden-mean",
        help="what z is: the base model's mean hidden state (default) or MiniLM sentence embeddings",
    )
    r.add_argument("--layer", type=int, default=-1, help="hidden layer for hidden-mean (default -1: last)")
    r.add_argument("--chroma-host", help="use a `chroma run` server at this host instead of embedded Chroma")
    r.add_argument("--chroma-port", type=int, help="port of the Chroma server")
    r.add_argument(
        "--blob-key-file",
        help="encrypt every adapter blob at rest with this AES-256-GCM key file "
        "(`rpe blob-key new FILE`; default: $RPE_BLOB_KEY_FILE, else $RPE_BLOB_KEY; none: plaintext "
        "blobs). Fixed for the registry's life; z and metadata stay unencrypted",
    )
    r.set_defaults(func=cmd_registry_init)

    r = rsub.add_parser(
        "add",
        help="add a PEFT adapter directory with its embedding",
        description="Validate and store one adapter. Rejected input changes nothing.",
    )
    r.add_argument("--registry", required=True)
    r.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + safetensors)")
    r.add_argument("--embedding", required=True, help=".npy file with the site's mean embedding z")
    r.add_argument("--site", required=True)
    r.add_argument("--task", required=True)
    r.add_argument("--modality", default="text")
    r.add_argument("--samples", type=int, required=True, help="number of training examples")
    r.add_argument("--base-fingerprint", help="defaults to the registry's (first) base")
    r.add_argument("--json", action="store_true")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_add)

    r = rsub.add_parser("ls", help="list records", description="List live records, optionally filtered.")
    r.add_argument("--registry", required=True)
    r.add_argument("--task")
    r.add_argument("--modality")
    r.add_argument("--site")
    r.add_argument("--json", action="store_true")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_ls)

    r = rsub.add_parser("show", help="show one record", description="Print one record as JSON.")
    r.add_argument("--registry", required=True)
    r.add_argument("id")
    r.add_argument("--z", action="store_true", help="include the embedding vector")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_show)

    r = rsub.add_parser("rm", help="remove a record", description="Tombstone a record (its blob is kept).")
    r.add_argument("--registry", required=True)
    r.add_argument("id")
    r.add_argument("--reason", help="recorded in the audit log")
    r.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    r.set_defaults(func=cmd_registry_rm)

    b = sub.add_parser(
        "blob-key",
        help="create the key that encrypts a registry's adapter blobs at rest",
        description="AES-256-GCM encryption of adapter blobs at rest (optional). Create a key "
        "file, then `rpe registry init --blob-key-file FILE`; every later command "
        "that stores or reads adapters needs --blob-key-file FILE or "
        "$RPE_BLOB_KEY_FILE (or the key itself in $RPE_BLOB_KEY). z, metadata and "
        "the audit log are not encrypted; there is no key rotation.",
    )
    bsub = b.add_subparsers(dest="blob_key_command", required=True, metavar="ACTION")
    r = bsub.add_parser(
        "new",
        help="write a fresh random key (64 hex digits, mode 0600) and print its id",
        description="Write 32 random bytes as 64 hex digits to FILE with mode 0600. Refuses to "
        "overwrite FILE. Keep a backup: an encrypted registry is unreadable without it.",
    )
    r.add_argument("file", metavar="FILE", help="key file to create")
    r.set_defaults(func=cmd_blob_key_new)

    c = sub.add_parser(
        "compose",
        help="retrieve, weigh and compose adapters for a target embedding",
        description="θ = θ0 + Σ w_i δθ_i over the k nearest adapters; writes a PEFT adapter dir.",
    )
    c.add_argument("--registry", required=True)
    c.add_argument("--embedding", required=True, help=".npy with the target's mean embedding")
    c.add_argument("--strategy", choices=["sim", "lin", "lin-l1", "avg", "nearest"], default="sim")
    c.add_argument("--k", type=int, default=4, help="number of adapters to retrieve, one per site (default 4)")
    c.add_argument(
        "--several-per-site",
        action="store_true",
        help="let a site that holds several adapters fill several of the k places (default: its nearest one only)",
    )
    c.add_argument("--exclude-site", help="leave this site's own adapters out (leave-one-out)")
    c.add_argument("--task", help="only retrieve adapters of this task")
    c.add_argument("--max-rank", type=int, help="re-compress to the best rank-R approximation")
    c.add_argument("--lam1", type=float, help="sim temperature (default: median squared distance)")
    c.add_argument(
        "--max-l1",
        type=float,
        help="lin / lin-l1: bound on ‖w‖₁, how far the weights may cancel (default 3; inf = unbounded)",
    )
    c.add_argument("--lam2", type=float, help="lin-l1 L1 strength (default: relative to the distances)")
    c.add_argument(
        "--far-ratio",
        type=float,
        default=DEFAULT_FAR_RATIO,
        help="warn 'nothing close enough' when the nearest retrieved adapter is more than this many times "
        "the library's usual spacing away (squared L2; benchmarks/ZERO_SHOT.md calibrates it); the adapter "
        f"is still written. 0 turns the check off (default {DEFAULT_FAR_RATIO:g}, as the run-config key far-ratio)",
    )
    c.add_argument(
        "--update-norm",
        choices=UPDATE_NORMS,
        default=DEFAULT_UPDATE_NORM,
        help=f"rescale the retrieved adapters' updates before weighting: {UPDATE_NORM_HELP}; the composition is "
        "then Σ w_i c_i δ_i with c_i = median norm / own norm, recorded in the audit entry (as the run-config key "
        "update-norm)",
    )
    c.add_argument("--target", default="cli", help="name recorded in the audit log")
    c.add_argument("--out", required=True, help="output PEFT adapter directory (written whole, then swapped in)")
    c.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out that is not an earlier composition (default: refuse, so no adapter is lost)",
    )
    c.add_argument("--json", action="store_true")
    c.add_argument("--blob-key-file", help=_BLOB_KEY_HELP)
    c.set_defaults(func=cmd_compose)

    register_audit(sub)

    x = sub.add_parser(
        "experiment",
        help="library-level leave-one-group-out experiment on real data",
        description="Train a LoRA per report group on SmolLM2-135M, then for each group "
        "compose the others with every strategy and score ROUGE-L.",
    )
    x.add_argument(
        "--profile",
        choices=["quick", "full"],
        default="quick",
        help="quick: 2-core CPU budget (default); full: more data and steps (GPU)",
    )
    x.add_argument("--out", default="runs/experiment", help="output directory")
    x.add_argument("--groups", nargs="*", help="report groups (default: the four largest distinct ones)")
    x.set_defaults(func=cmd_experiment)
